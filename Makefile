# make run    set up (once) and train the default run: an MLP on digits, 2 CPU ranks
# make test   set up (once) and run the checks: ruff, then the test suite
# make test-fast  the quick subset for working on the code (under a minute): the arithmetic,
#                 the config, convert, the public API in a real W=2 group
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run test test-fast lint format clean

FAST = tests/test_reduction.py tests/test_sampler.py tests/test_architecture.py \
       tests/test_models.py tests/test_config.py tests/test_api.py tests/test_bench.py \
       tests/test_convert.py

setup: $(VENV)/.installed

# torch is installed first, as TORCH from TORCH_INDEX: the project itself asks only torch>=2.6,
# which the pin satisfies, so nothing larger is fetched. Which build you get is the index's
# choice: empty TORCH_INDEX is pip's own configured index (PyPI serves its CUDA build for Linux);
# TORCH_INDEX=https://download.pytorch.org/whl/cpu gives the CPU build the project is tested with.
TORCH       ?= torch==2.13.0
TORCH_INDEX ?=
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,clients]"
	touch $@

run: setup
	$(BIN)/ddp-reduce $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q

test-fast: setup lint
	$(BIN)/python -m pytest -q $(FAST) -m "not cli" \
	    -k "not exact_verdicts_hold and not approximate_batch_rule"

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache *.egg-info
