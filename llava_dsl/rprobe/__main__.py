"""``python -m llava_dsl.rprobe {train,eval,compare}``: the R-Probe stage (see ``llava_dsl.rprobe.cli``)."""
from llava_dsl.rprobe.cli import main

if __name__ == "__main__":
    main()
