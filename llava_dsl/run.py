"""``python -m llava_dsl.run <module> [args]``: run any LLaVA tool with the plugin registered.

A checkpoint trained with a multi-layer projector (``mm_projector_type`` ``mlp_multilayer``,
``detached_mlp_multilayer``, ...) only loads where the plugin is registered; stock LLaVA tools stop with
"Unknown projector type". This entry point registers it, then runs the module exactly as ``python -m``
would (``__name__ == "__main__"``, ``sys.argv[0]`` the module's file), e.g.

    python -m llava_dsl.run llava.eval.model_vqa_loader --model-path checkpoints/llava-dsl-7b ...
    python -m llava_dsl.run llava.serve.cli --model-path checkpoints/llava-dsl-7b --image-file x.jpg
"""
from __future__ import annotations

import importlib.util
import runpy
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0 if argv else 2)
    module, module_args = argv[0], argv[1:]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise SystemExit(f"llava_dsl.run: no module named {module!r} (expected a module path such as "
                         f"llava.eval.model_vqa_loader or llava.serve.cli)")

    import llava_dsl

    llava_dsl.register()
    sys.argv = [module] + module_args  # run_module replaces argv[0] with the module's file
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
