"""An axolotl plugin for the tests: `plugins: [capture_axolotl.CapturePlugin]` adds grad_capture's recorder."""
from axolotl.integrations.base import BasePlugin
from grad_capture import GradCapture


class CapturePlugin(BasePlugin):
    def add_callbacks_post_trainer(self, cfg, trainer):
        return [GradCapture()]
