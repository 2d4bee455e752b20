"""R-Probe: can the LLM's own first layers decode the projected visual tokens back to pixels?

    python -m llava_dsl.rprobe {train,eval,compare} ...

``model`` (the probe, geometry and metrics; plain torch), ``data`` (LLaVA's json + images as the model sees
them), ``checkpoint`` (loading a LLaVA checkpoint), ``runner`` (frozen MLLM + probe as one module),
``config``, ``loop`` (training, evaluation, resume), ``report`` (pictures and tables), ``aux_loss`` (the probe as an
auxiliary loss in ordinary training), ``cli``."""
