"""An empty stand-in for torchaudio in .venv-llamafactory (copied into site-packages by `make venv-llamafactory`).

LLaMA-Factory 0.9.5's llamafactory/data/mm_plugin.py imports torchaudio at module level but calls it only for audio
inputs. PyPI's torchaudio paired with torch 2.13.0 (2.11.1) fails to load its _torchaudio.so beside the local CPU
torch, so image and text training would not even start. This package has no distribution metadata, so transformers'
is_torchaudio_available() stays False; an audio dataset fails at the first torchaudio call, which names it.
Delete it once a torchaudio that loads beside the CPU torch is on the index.
"""
