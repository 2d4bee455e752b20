"""Write the built-in synthetic OCR data set into playground/data/ocr_demo/ (LLaVA's layout).

    python playground/data/make_ocr_demo.py [--out DIR] [--seed N] [--image-size PX] [--num-pretrain N] ...

The same as ``python -m llava_dsl.assets.ocr_data``; the generator lives in llava_dsl/assets/ocr_data.py.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root: works without installing

from llava_dsl.assets.ocr_data import main  # noqa: E402

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not any(a == "--out" or a.startswith("--out=") for a in arguments):
        arguments = ["--out", os.path.join(HERE, "ocr_demo")] + arguments
    main(arguments)
