"""`python -m llava_dsl.integrations.llamafactory` with the tests' gradient recorder added to its callbacks:
    python llamafactory_capture.py cfg.yaml [key=value ...]"""
import sys

from grad_capture import GradCapture

from llava_dsl.integrations.llamafactory import main

if __name__ == "__main__":
    main(sys.argv[1:], extra_callbacks=[GradCapture()])
