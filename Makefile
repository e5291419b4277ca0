# The two commands of the README. Each makes .venv if missing and installs with the
# tested constraints, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint slow clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is installed first and alone, pinned, so no later step can pull a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bayesify report --out report

lint: $(STAMP)
	$(BIN)/ruff check bayesify tests benchmarks

test: $(STAMP) lint
	MPLBACKEND=Agg $(BIN)/python -m pytest -q -p no:cacheprovider tests
	MPLBACKEND=Agg $(BIN)/python -m pytest -q -p no:cacheprovider --nbmake notebooks -W default

slow: $(STAMP)
	MPLBACKEND=Agg $(BIN)/python -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) report
