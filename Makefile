# `make test` and `make demo` build .venv from nothing: torch first (the local CPU wheel, pinned by
# constraints.txt so nothing can pull a CUDA build), deepspeed without build isolation (its setup imports
# torch), LLaVA with --no-deps, then this package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.llava-dsl-installed
PYTEST_ARGS ?=

.PHONY: venv test demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt setuptools wheel ninja packaging py-cpuinfo psutil pydantic hjson numpy
	$(PIP) install --quiet -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install --quiet --no-deps llava-torch==1.2.2.post1
	$(PIP) install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The venv's bin/ goes first on PATH so the tests and scripts find its `deepspeed` launcher.
test: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

# DEMO_SCALE=4 make demo: four times the steps and data; DEMO_ARGS="--output_dir DIR --seed N" for the rest.
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m llava_dsl.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV)

# Second environment for Hugging Face exports (docs/export_hf.md): stock transformers 4.57.6 on the same CPU torch,
# kept out of .venv (LLaVA needs transformers 4.37.2). Built once, cached by its stamp; tests/test_export_hf.py uses it.
VENV_HF ?= .venv-hf
HF_STAMP := $(VENV_HF)/.llava-dsl-hf-installed

.PHONY: venv-hf clean-hf

venv-hf: $(HF_STAMP)

$(HF_STAMP): scripts/hf_env/constraints.txt scripts/hf_env/requirements.txt
	$(PYTHON) -m venv $(VENV_HF)
	$(VENV_HF)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_HF)/bin/python -m pip install --quiet -c scripts/hf_env/constraints.txt torch==2.13.0
	$(VENV_HF)/bin/python -m pip install --quiet -c scripts/hf_env/constraints.txt -r scripts/hf_env/requirements.txt
	touch $(HF_STAMP)

test: $(HF_STAMP)

clean-hf:
	rm -rf $(VENV_HF)
