"""tests/hf runs in the stock Hugging Face environments (.venv-hf: transformers 4.57, .venv-hf5: 5.x), through
`make test-hf`. Under any other stack (the main .venv has LLaVA's transformers 4.37.2) the folder is skipped whole:
nothing here is collected there."""
import importlib.metadata as metadata
import os
import sys

from packaging.version import Version

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _stock_stack() -> bool:
    try:
        return Version(metadata.version("transformers")) >= Version("4.57") and bool(metadata.version("trl"))
    except metadata.PackageNotFoundError:
        return False


if not _stock_stack():
    collect_ignore_glob = ["test_*.py"]
else:
    for path in (ROOT, HERE):
        if path not in sys.path:
            sys.path.insert(0, path)


def pytest_configure(config):
    config.addinivalue_line("markers", "launch: starts the entry point in subprocesses (launchers, kill, resume); "
                                       "make test-hf runs these once, in the transformers 5.x environment")
