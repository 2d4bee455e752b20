"""The environment the demo's and the study's steps run in puts this checkout's root on PYTHONPATH, never the
package folder itself (whose evaluate/, hf/, ... would shadow top-level packages of the same names)."""
import os
import subprocess
import sys

import llava_dsl
from llava_dsl.demo.stage_flags import child_env

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(llava_dsl.__file__)))


def test_steps_import_this_checkout_from_any_folder(tmp_path):
    env = child_env()
    assert env["PYTHONPATH"].split(os.pathsep)[0] == REPO_ROOT
    assert env["CUDA_VISIBLE_DEVICES"] == ""  # the demo's numbers compare across machines: CPU everywhere
    probe = "import importlib.util, llava_dsl; print(llava_dsl.__file__); print(importlib.util.find_spec('evaluate'))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == llava_dsl.__file__
    assert "llava_dsl" not in out[1], f"the package folder is on PYTHONPATH: 'evaluate' resolves to {out[1]}"
