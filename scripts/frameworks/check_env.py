"""The last step of `make venv-swift / venv-llamafactory / venv-axolotl`: fail the build (before its stamp) unless the
environment is the CPU stack it pins and the framework's training entry and llava_dsl's integration import.

    python scripts/frameworks/check_env.py FRAMEWORK [--allow-triton] MODULE...  # llamafactory llamafactory.train.tuner

- torch is the local CPU build and no CUDA runtime package (nvidia-*, triton, cuda-*) came in; --allow-triton lets
  triton stay (axolotl imports it unconditionally: scripts/frameworks/axolotl/requirements.txt);
- no torchvision / torchaudio distribution is installed (PyPI's builds do not load beside the CPU torch);
- each MODULE imports (the framework's entry, llava_dsl.integrations.<framework>).
"""
import importlib
import sys
from importlib import metadata


def main(framework, modules, allow_triton=False):
    problems = []
    names = sorted({(d.metadata["Name"] or "").lower() for d in metadata.distributions()})
    cuda = [n for n in names if n.startswith(("nvidia", "cuda-")) or n == "pytorch-triton"
            or (n == "triton" and not allow_triton)]
    if cuda:
        problems.append(f"CUDA packages in the environment: {cuda}")
    torch_version = metadata.version("torch")
    if "+cpu" not in torch_version:
        problems.append(f"torch {torch_version} is not the local CPU build (torch==2.13.0+cpu)")
    for name in ("torchvision", "torchaudio"):
        if name in names:
            problems.append(f"{name} {metadata.version(name)} is installed: PyPI's build does not load beside the "
                            f"CPU torch")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - report every failure, then fail once
            problems.append(f"import {module}: {type(error).__name__}: {error}")
    if problems:
        sys.exit(f"the {framework} environment is not usable:\n  " + "\n  ".join(problems))
    print(f"{framework} {metadata.version(framework)}: transformers {metadata.version('transformers')}, "
          f"torch {torch_version}, trl {metadata.version('trl')}, peft {metadata.version('peft')}: ok")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1], [m for m in sys.argv[2:] if m != "--allow-triton"], allow_triton="--allow-triton" in sys.argv)
