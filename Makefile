# Kiln: `make demo` and `make test` are the two commands a new user needs (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installed first and on its own: an unpinned torch resolves to several GB of CUDA packages.
TORCH := torch==2.13.0
STAMP := $(VENV)/.kiln-installed

.PHONY: setup demo test test-fast lint format

setup: $(STAMP)

# Re-installs only when the project's metadata or this recipe changed.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(PY) -m pip install -q $(TORCH)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	@touch $@

# The whole job on the embedded corpus: prepare data, train the tiny model (a fresh run each
# time), evaluate it, export it as a Hugging Face model, and sample text from it. About 10
# minutes on a 2-core CPU.
DEMO_RUN := runs/demo/train
demo: setup
	$(VENV)/bin/kiln data prepare configs/data/demo.yaml
	rm -rf $(DEMO_RUN)
	$(VENV)/bin/kiln train configs/train/tiny.yaml --run-dir $(DEMO_RUN)
	$(VENV)/bin/kiln eval $(DEMO_RUN)
	$(VENV)/bin/kiln export $(DEMO_RUN) --to hf runs/demo/hf --overwrite
	$(VENV)/bin/kiln generate $(DEMO_RUN) --prompt "def " --max-new-tokens 80 --temperature 0.7 --top-k 40

# Everything, integration tests included: what CI runs (about 30 minutes on 2 cores).
test: setup
	$(PY) -m pytest tests

# The unit tests only, in process (under 2 minutes): the loop while changing code.
test-fast: setup
	$(PY) -m pytest tests -m "not integration" -q

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
