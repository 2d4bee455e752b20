"""``python -m llava_dsl.analyze attention ...``: where text stops attending to the image, to choose DPVR-LF's
routing layer. The measure and its report live in ``llava_dsl.dpvr.attention_share``."""
from llava_dsl.dpvr.attention_share import main

if __name__ == "__main__":
    main()
