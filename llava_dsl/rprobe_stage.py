"""Moved: the R-Probe stage is ``python -m llava_dsl.rprobe {train,eval,compare}`` (package ``llava_dsl.rprobe``).

This name still runs it, so existing command lines keep working.
"""
import sys

from llava_dsl.rprobe.cli import main

if __name__ == "__main__":
    print("llava_dsl.rprobe_stage has moved to llava_dsl.rprobe; running it from there", file=sys.stderr)
    main()
