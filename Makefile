# The README's two commands: `make demo` and `make test`. Both create or reuse .venv and install
# with constraints.txt, which pins torch to the CPU build on this project's machines.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install demo test lint typecheck unit docs figures clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,docs,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/consistent-char extract "a creature" --model toy --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples recipes scripts/*.py
	$(BIN)/ruff format --check src tests benchmarks examples recipes scripts/*.py

typecheck: $(STAMP)
	$(BIN)/mypy src recipes

unit: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck unit docs

# The documentation site, offline; --strict fails on any warning (broken link, missing page).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The docs' figures (report screenshot, story sheet) from the demo run; needs chromium.
figures: $(STAMP)
	$(BIN)/python scripts/make_figures.py runs/demo

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache .ruff_cache
