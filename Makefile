# Set-up from a fresh machine: `make demo` or `make test` create .venv and install carclf into it.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision pinned to the releases on this platform's disk; elsewhere pip takes them from PyPI.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test lint bench clean

$(BIN)/carclf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/carclf

venv: $(BIN)/carclf

demo: venv
	$(BIN)/carclf demo --overwrite

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks

bench: venv
	$(BIN)/python benchmarks/cars196.py

clean:
	rm -rf $(VENV) runs
