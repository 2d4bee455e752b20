"""tests/integrations runs in the fine-tuning frameworks' own environments (`make test-integrations`: .venv-swift,
.venv-llamafactory, .venv-axolotl). A test file is collected only where its framework imports, so the main suite
and the stock Hugging Face suites skip this folder whole."""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = {"swift": "test_ms_swift_dsl.py", "llamafactory": "test_llamafactory_dsl.py", "axolotl": "test_axolotl_dsl.py"}

collect_ignore_glob = [name for module, name in FILES.items() if importlib.util.find_spec(module) is None]
if HERE not in sys.path:
    sys.path.insert(0, HERE)
