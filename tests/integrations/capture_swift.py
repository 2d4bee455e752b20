"""An ms-swift external plugin file for the tests: ``--external_plugins <this file> --callbacks dsl_capture``."""
from grad_capture import GradCapture  # ms-swift puts this file's folder on sys.path
from swift.callbacks import TrainerCallback, callbacks_map


class SwiftGradCapture(GradCapture, TrainerCallback):
    def __init__(self, args, trainer):
        GradCapture.__init__(self)


callbacks_map["dsl_capture"] = SwiftGradCapture
