# The two commands of the README: `make demo` and `make test`.
# Both create .venv on first use. torch is installed first, pinned, so that no
# dependency resolution can pull a CUDA build of torch onto a CPU machine.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mergekit-aim-installed
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install lint mergekit-tests clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,triton]"
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mergekit-aim demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(PY) -m ruff check mergekit_aim tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info
