"""The last step of `make venv-lmms`: fail the build (before its stamp) unless .venv-lmms is the CPU stack it pins.

- torch is the local CPU build and no CUDA runtime package (nvidia-*, triton) came in;
- torchvision is absent (PyPI's build cannot load its ops beside the CPU torch; see constraints.txt);
- filelock < 4 (lmms-eval 0.7.3 imports filelock._api);
- lmms-eval's CLI module, its llava_hf model (decord) and the metric code of the local tasks import.
"""
import importlib
import sys
from importlib import metadata

from packaging.version import Version

problems = []
names = sorted({(d.metadata["Name"] or "").lower() for d in metadata.distributions()})
cuda = [n for n in names if n.startswith("nvidia") or n in ("triton", "cuda-python", "cuda-bindings")]
if cuda:
    problems.append(f"CUDA packages in the environment: {cuda}")
torch_version = metadata.version("torch")
if "+cpu" not in torch_version:
    problems.append(f"torch {torch_version} is not the local CPU build (torch==2.13.0+cpu)")
if "torchvision" in names:
    problems.append("torchvision is installed: PyPI's build does not load beside the CPU torch")
if Version(metadata.version("filelock")) >= Version("4"):
    problems.append(f"filelock {metadata.version('filelock')}: lmms-eval 0.7.3 needs filelock<4")
for module in ("lmms_eval.__main__", "lmms_eval.models.simple.llava_hf", "lmms_eval.models.chat.llava_hf",
               "lmms_eval.tasks.textvqa.utils", "lmms_eval.tasks.ocrbench.utils", "lmms_eval.tasks.docvqa.utils",
               "lmms_eval.tasks.infovqa.utils", "lmms_eval.tasks.chartqa.utils", "lmms_eval.api.metrics"):
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - report every failure, then fail once
        problems.append(f"import {module}: {type(error).__name__}: {error}")
if problems:
    sys.exit(".venv-lmms is not usable:\n  " + "\n  ".join(problems))
print(f"lmms-eval {metadata.version('lmms-eval')}, transformers {metadata.version('transformers')}, "
      f"torch {torch_version}, filelock {metadata.version('filelock')}, decord {metadata.version('decord')}: ok")
