"""python -m llava_dsl.study: the multi-seed study of the paper's three claims (docs/study.md)."""
