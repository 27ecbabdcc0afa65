# The three commands of the README. Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# What a command needs first: the venv. `DEPS=` skips it where python already has the
# packages (a GPU machine with no network: `make gpu-check PY=python3 DEPS=`).
DEPS ?= $(STAMP)

.PHONY: run test demo bench gpu-check clean-venv

run: $(DEPS)  ## the main job: both notebooks on ViT-L/14 and the real datasets
	$(PY) -m clip_utils.app.notebooks Task1.ipynb Task2.ipynb

test: $(DEPS)  ## the whole test suite, offline, on CPU (a worker per core; a test file stays in one worker)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n auto --dist loadfile

demo: $(DEPS)  ## both notebooks offline on the bundled tiny model and generated data
	$(PY) -m clip_utils.app.notebooks --demo

bench: $(DEPS)  ## speed benchmark (use on a CUDA machine; --small runs on CPU)
	$(PY) -m clip_utils.app.bench

gpu-check: $(DEPS)  ## on a CUDA machine: the GPU-only tests, then the full benchmark
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m cuda tests/test_cuda.py
	$(PY) -m clip_utils.app.bench --json results/bench.json

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
