"""The built-in end-to-end demo (``make demo``, ``python -m llava_dsl.demo``): ``pipeline`` runs the package's own
commands for every projector type, ``figures`` draws the curves and writes the results table. See docs/demo.md."""
