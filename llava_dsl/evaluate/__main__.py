"""``python -m llava_dsl.evaluate``: OCR benchmarks end to end (see ``llava_dsl.evaluate.runner``)."""
from llava_dsl.evaluate.runner import main

if __name__ == "__main__":
    main()
