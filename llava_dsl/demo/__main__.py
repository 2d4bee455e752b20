"""``python -m llava_dsl.demo``: the built-in comparison on CPU (see ``llava_dsl.demo.pipeline``)."""
from llava_dsl.demo.pipeline import main

if __name__ == "__main__":
    main()
