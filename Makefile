# make run    set up (once) and train the default run: an MLP on digits, 2 CPU ranks
# make test   set up (once) and run the checks: ruff, then the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup run test lint format clean

setup: $(VENV)/.installed

# torch is pinned first: this CPU build is what the project is tested with; the project itself
# asks only torch>=2.6, which the pin satisfies, so nothing larger is fetched.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

run: setup
	$(BIN)/ddp-reduce $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache *.egg-info
