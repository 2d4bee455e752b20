# `make test` and `make demo` build .venv from nothing: torch first (the local CPU wheel, pinned by
# constraints.txt so nothing can pull a CUDA build), deepspeed without build isolation (its setup imports
# torch), LLaVA with --no-deps, then this package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.llava-dsl-installed
# the stock Hugging Face environment (below); named here because test-main needs it too
VENV_HF ?= .venv-hf
HF_STAMP := $(VENV_HF)/.llava-dsl-hf-installed
PYTEST_ARGS ?=

.PHONY: venv test test-main test-reading demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt setuptools wheel ninja packaging py-cpuinfo psutil pydantic hjson numpy
	$(PIP) install --quiet -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install --quiet --no-deps llava-torch==1.2.2.post1
	$(PIP) install --quiet -c constraints.txt -e '.[llava,study,test]'
	touch $(STAMP)

# `make test` runs every suite, each in its own environment, two at a time: the main one in two parts (test-main,
# and test-reading: the tests that build the pretrained parts and run the demo on them, about 12 minutes of one
# core), the stock Hugging Face ones (test-hf), lmms-eval's (test-lmms) and the fine-tuning frameworks'
# (test-integrations: ms-swift, LLaMA-Factory, axolotl). Each part's output is printed whole when it ends.
# TEST_JOBS=1 runs them one after another; `.venv/bin/python -m pytest` runs both main parts in one go.
TEST_JOBS ?= 2
READING_TESTS := tests/assets/test_pretrained.py tests/demo
test:
	$(MAKE) --no-print-directory -j$(TEST_JOBS) --output-sync=target test-main test-reading test-hf test-lmms \
	    test-integrations

# The tests start python, deepspeed and shellcheck from beside the interpreter that runs them (tests/support.py),
# so `.venv/bin/python -m pytest` works the same with any PATH. tests/export loads its exports with stock
# transformers in .venv-hf, so that environment comes first.
test-main: $(STAMP) $(HF_STAMP)
	$(PY) -m pytest $(addprefix --ignore=,$(READING_TESTS)) --durations=10 $(PYTEST_ARGS)

test-reading: $(STAMP)
	$(PY) -m pytest $(READING_TESTS) --durations=5 $(PYTEST_ARGS)

# DEMO_SCALE=4 make demo: twice the default's steps and data (DEMO_SCALE=1: half, about 5 min); DEMO_ARGS="--output_dir DIR --seed N" for the rest.
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m llava_dsl.demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV)

# Second environment for Hugging Face exports (docs/export_hf.md): stock transformers 4.57.6 on the same CPU torch,
# kept out of .venv (LLaVA needs transformers 4.37.2). Built once, cached by its stamp; tests/export/test_export_hf.py uses it.
# It also carries the 4.57 end of the stock training stack (TRL, PEFT, accelerate, DeepSpeed) for tests/hf, which
# imports llava_dsl from this checkout through PYTHONPATH: the plugin stays uninstalled there, so the export check
# proves that an export loads without it.
# The newest stock stack that installs (transformers 5.x): the other end of the range llava_dsl.hf is tested on
# (docs/hf.md). llava_dsl goes in last as a user installs it, `pip install '.[hf]'` with its dependencies: the core
# pins no transformers, so the 5.24 stack stays (tests/hf/test_install.py checks it).
VENV_HF5 ?= .venv-hf5
HF5_STAMP := $(VENV_HF5)/.llava-dsl-hf5-installed
DEEPSPEED_BUILD_DEPS := setuptools wheel ninja packaging py-cpuinfo psutil pydantic hjson msgpack numpy
HF_PYTEST_ARGS ?=

.PHONY: venv-hf venv-hf5 clean-hf test-hf test-hf4 test-hf5

venv-hf: $(HF_STAMP)

$(HF_STAMP): scripts/hf_env/constraints.txt scripts/hf_env/requirements.txt
	$(PYTHON) -m venv $(VENV_HF)
	$(VENV_HF)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_HF)/bin/python -m pip install --quiet -c scripts/hf_env/constraints.txt torch==2.13.0
	$(VENV_HF)/bin/python -m pip install --quiet -c scripts/hf_env/constraints.txt -r scripts/hf_env/requirements.txt
	$(VENV_HF)/bin/python -m pip install --quiet -c scripts/hf_env/constraints.txt $(DEEPSPEED_BUILD_DEPS)
	$(VENV_HF)/bin/python -m pip install --quiet -c scripts/hf_env/constraints.txt --no-build-isolation deepspeed
	touch $(HF_STAMP)

venv-hf5: $(HF5_STAMP)

$(HF5_STAMP): scripts/hf_env5/constraints.txt scripts/hf_env5/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV_HF5)
	echo '*' > $(VENV_HF5)/.gitignore
	$(VENV_HF5)/bin/python -m pip install --quiet --upgrade pip
	$(VENV_HF5)/bin/python -m pip install --quiet -c scripts/hf_env5/constraints.txt torch==2.13.0
	$(VENV_HF5)/bin/python -m pip install --quiet -c scripts/hf_env5/constraints.txt -r scripts/hf_env5/requirements.txt
	$(VENV_HF5)/bin/python -m pip install --quiet -c scripts/hf_env5/constraints.txt $(DEEPSPEED_BUILD_DEPS)
	$(VENV_HF5)/bin/python -m pip install --quiet -c scripts/hf_env5/constraints.txt --no-build-isolation deepspeed
	$(VENV_HF5)/bin/python -m pip install --quiet -c scripts/hf_env5/constraints.txt --no-build-isolation -e '.[hf]'
	touch $(HF5_STAMP)

# DeepSpeed's CPU all-reduce op, JIT-built once into the environment's own extension folder (the default cache is
# shared with the main .venv, whose older DeepSpeed leaves an incompatible build there); minutes on 2 cores.
HF5_TORCH_EXT := $(abspath $(VENV_HF5))/torch_extensions
HF5_SHM_OP := $(HF5_TORCH_EXT)/deepspeed_shm_comm/deepspeed_shm_comm.so

$(HF5_SHM_OP): $(HF5_STAMP)
	TORCH_EXTENSIONS_DIR="$(HF5_TORCH_EXT)" OMP_NUM_THREADS=1 $(VENV_HF5)/bin/python -c \
	    "from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load()"

# tests/hf in both stock stacks (the main pytest run skips the folder: tests/hf/conftest.py). The fast in-process
# tests run in both; the launched ones (marker `launch`: entry point end to end, resume after a kill, DDP, ZeRO-3)
# run once, in the 5.x stack. The venv's bin/ goes first on PATH so the tests find its `deepspeed` launcher.
test-hf: test-hf4 test-hf5

test-hf4: $(HF_STAMP)
	PATH="$(abspath $(VENV_HF))/bin:$$PATH" PYTHONPATH="$(CURDIR)" $(VENV_HF)/bin/python -m pytest tests/hf \
	    -m "not launch" $(HF_PYTEST_ARGS)

test-hf5: $(HF5_STAMP) $(HF5_SHM_OP)
	PATH="$(abspath $(VENV_HF5))/bin:$$PATH" TORCH_EXTENSIONS_DIR="$(HF5_TORCH_EXT)" \
	    $(VENV_HF5)/bin/python -m pytest tests/hf $(HF_PYTEST_ARGS)


clean-hf:
	rm -rf $(VENV_HF) $(VENV_HF5)

# Third environment for lmms-eval (docs/lmms_eval.md): lmms-eval 0.7.3 on transformers 5.24 and the same CPU torch,
# pinned by scripts/lmms_eval/constraints.txt. torch goes first; lmms-eval goes in with --no-deps because its
# declared torchvision has no build that loads beside the CPU torch (every other pairing pulls a CUDA torch), last,
# after scripts/lmms_eval/requirements.txt: what its CLI, the llava_hf model and the OCR tasks import (decord and
# filelock<4 included). check_env.py fails the build on a CUDA package, a torchvision or an import that breaks.
# tests/lmms_eval imports llava_dsl from this checkout through PYTHONPATH; the lmms-eval process itself does not.
VENV_LMMS ?= .venv-lmms
LMMS_STAMP := $(VENV_LMMS)/.llava-dsl-lmms-installed
LMMS_PIP := $(VENV_LMMS)/bin/python -m pip install --quiet -c scripts/lmms_eval/constraints.txt
LMMS_PYTEST_ARGS ?=

.PHONY: venv-lmms test-lmms clean-lmms

venv-lmms: $(LMMS_STAMP)

$(LMMS_STAMP): scripts/lmms_eval/constraints.txt scripts/lmms_eval/requirements.txt scripts/lmms_eval/check_env.py
	$(PYTHON) -m venv $(VENV_LMMS)
	echo '*' > $(VENV_LMMS)/.gitignore
	$(VENV_LMMS)/bin/python -m pip install --quiet --upgrade pip
	$(LMMS_PIP) torch==2.13.0
	$(LMMS_PIP) -r scripts/lmms_eval/requirements.txt
	$(LMMS_PIP) --no-deps lmms-eval
	OMP_NUM_THREADS=1 $(VENV_LMMS)/bin/python scripts/lmms_eval/check_env.py
	touch $(LMMS_STAMP)

# tests/lmms_eval: lmms-eval's CLI on a tiny DSL checkpoint, scores equal to llava_dsl.evaluate's on the same answers.
test-lmms: $(LMMS_STAMP)
	OMP_NUM_THREADS=1 PYTHONPATH="$(CURDIR)" $(VENV_LMMS)/bin/python -m pytest tests/lmms_eval $(LMMS_PYTEST_ARGS)


clean-lmms:
	rm -rf $(VENV_LMMS)

# Fine-tuning frameworks (docs/integrations.md): one environment each, pinned by scripts/frameworks/<name>/, with
# llava_dsl installed editable ([hf] extra where the framework's pins fit it). torch goes first (the local CPU
# wheel); scripts/frameworks/check_env.py fails the build on a CUDA package, a torchvision / torchaudio, or an entry
# point that does not import. tests/integrations runs the framework's own entry on a tiny Llava in each.
VENV_SWIFT ?= .venv-swift
SWIFT_STAMP := $(VENV_SWIFT)/.llava-dsl-swift-installed
SWIFT_PIP := $(VENV_SWIFT)/bin/python -m pip install --quiet -c scripts/frameworks/swift/constraints.txt
VENV_AXOLOTL ?= .venv-axolotl
AXOLOTL_STAMP := $(VENV_AXOLOTL)/.llava-dsl-axolotl-installed
AXOLOTL_PIP := $(VENV_AXOLOTL)/bin/python -m pip install --quiet -c scripts/frameworks/axolotl/constraints.txt
VENV_LF ?= .venv-llamafactory
LF_STAMP := $(VENV_LF)/.llava-dsl-llamafactory-installed
LF_PIP := $(VENV_LF)/bin/python -m pip install --quiet -c scripts/frameworks/llamafactory/constraints.txt
INTEGRATIONS_PYTEST_ARGS ?=

.PHONY: venv-swift venv-llamafactory venv-axolotl test-integrations test-swift test-llamafactory test-axolotl \
        clean-integrations

venv-swift: $(SWIFT_STAMP)

$(SWIFT_STAMP): scripts/frameworks/swift/constraints.txt scripts/frameworks/swift/requirements.txt \
                scripts/frameworks/check_env.py
	$(PYTHON) -m venv $(VENV_SWIFT)
	echo '*' > $(VENV_SWIFT)/.gitignore
	$(VENV_SWIFT)/bin/python -m pip install --quiet --upgrade pip
	$(SWIFT_PIP) torch==2.13.0
	$(SWIFT_PIP) -r scripts/frameworks/swift/requirements.txt
	$(SWIFT_PIP) -e '.[hf]'
	OMP_NUM_THREADS=1 $(VENV_SWIFT)/bin/python scripts/frameworks/check_env.py ms-swift swift.cli.sft \
	    llava_dsl.integrations.ms_swift
	touch $(SWIFT_STAMP)

# llamafactory goes in with --no-deps after the rest of its dependencies, and an empty torchaudio replaces the real
# one (scripts/frameworks/llamafactory/: constraints.txt and torchaudio_shim/ say why).
venv-llamafactory: $(LF_STAMP)

$(LF_STAMP): scripts/frameworks/llamafactory/constraints.txt scripts/frameworks/llamafactory/requirements.txt \
             scripts/frameworks/llamafactory/torchaudio_shim/torchaudio/__init__.py scripts/frameworks/check_env.py
	$(PYTHON) -m venv $(VENV_LF)
	echo '*' > $(VENV_LF)/.gitignore
	$(VENV_LF)/bin/python -m pip install --quiet --upgrade pip
	$(LF_PIP) torch==2.13.0
	$(LF_PIP) -r scripts/frameworks/llamafactory/requirements.txt
	$(LF_PIP) --no-deps llamafactory
	cp -r scripts/frameworks/llamafactory/torchaudio_shim/torchaudio \
	    "$$($(VENV_LF)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	$(LF_PIP) -e '.[hf]'
	OMP_NUM_THREADS=1 $(VENV_LF)/bin/python scripts/frameworks/check_env.py llamafactory llamafactory.train.tuner \
	    llava_dsl.integrations.llamafactory
	touch $(LF_STAMP)

# axolotl goes in with --no-deps after its dependencies less the GPU-only kernels; bitsandbytes and triton stay
# (scripts/frameworks/axolotl/: constraints.txt and requirements.txt say why).
venv-axolotl: $(AXOLOTL_STAMP)

$(AXOLOTL_STAMP): scripts/frameworks/axolotl/constraints.txt scripts/frameworks/axolotl/requirements.txt \
                  scripts/frameworks/check_env.py
	$(PYTHON) -m venv $(VENV_AXOLOTL)
	echo '*' > $(VENV_AXOLOTL)/.gitignore
	$(VENV_AXOLOTL)/bin/python -m pip install --quiet --upgrade pip
	$(AXOLOTL_PIP) torch==2.13.0
	$(AXOLOTL_PIP) -r scripts/frameworks/axolotl/requirements.txt
	$(AXOLOTL_PIP) --no-deps axolotl
	$(AXOLOTL_PIP) -e '.[hf]'
	OMP_NUM_THREADS=1 $(VENV_AXOLOTL)/bin/python scripts/frameworks/check_env.py axolotl --allow-triton \
	    axolotl.cli.train axolotl.core.builders llava_dsl.integrations.axolotl
	touch $(AXOLOTL_STAMP)

# tests/integrations in each framework's environment (its conftest.py collects a file only where its framework
# imports): a few 2-step runs of the framework's own entry per file.
test-integrations: test-swift test-llamafactory test-axolotl

test-swift: $(SWIFT_STAMP)
	OMP_NUM_THREADS=1 $(VENV_SWIFT)/bin/python -m pytest tests/integrations $(INTEGRATIONS_PYTEST_ARGS)

test-llamafactory: $(LF_STAMP)
	OMP_NUM_THREADS=1 $(VENV_LF)/bin/python -m pytest tests/integrations $(INTEGRATIONS_PYTEST_ARGS)

test-axolotl: $(AXOLOTL_STAMP)
	OMP_NUM_THREADS=1 $(VENV_AXOLOTL)/bin/python -m pytest tests/integrations $(INTEGRATIONS_PYTEST_ARGS)

clean-integrations:
	rm -rf $(VENV_SWIFT) $(VENV_LF) $(VENV_AXOLOTL)
