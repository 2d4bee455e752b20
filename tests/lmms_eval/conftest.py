"""tests/lmms_eval runs in .venv-lmms (lmms-eval 0.7.3 on transformers 5.x, `make test-lmms`). Under any other stack
(the main .venv, .venv-hf*) the folder is skipped whole: nothing here is collected there."""
import os
import sys
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _lmms_stack() -> bool:
    try:
        return bool(metadata.version("lmms-eval"))
    except metadata.PackageNotFoundError:
        return False


if not _lmms_stack():
    collect_ignore_glob = ["test_*.py"]
elif ROOT not in sys.path:
    sys.path.insert(0, ROOT)
