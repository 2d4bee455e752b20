"""Locally built models and data: tiny models from configs (``tiny_models``), the synthetic OCR data set with the
package's one text renderer (``ocr_data``), and the locally pretrained tiny tower and LM that read, built once and
cached (``pretrained``; ``python -m llava_dsl.assets build``). Nothing is downloaded."""
