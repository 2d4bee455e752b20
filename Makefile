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

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m llava_dsl.demo

clean:
	rm -rf $(VENV)
