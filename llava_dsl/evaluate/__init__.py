"""OCR-centric evaluation: ``benchmarks`` (each benchmark's own files, name -> loader), ``generate`` (answers for
LLaVA-format question files, resumable and sharded), ``scorers`` (reference-exact metrics, no model code) and
``runner`` (``python -m llava_dsl.evaluate``: generate, score, report, compare)."""
