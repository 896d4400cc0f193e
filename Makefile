PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

# torch is installed first, in its own pip call, so the local CPU wheel
# (torch==2.13.0 -> 2.13.0+cpu) is already satisfied when `-e .[dev]` resolves
# and no CUDA torch / nvidia-* packages are ever pulled.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/fastlibra demo

bench: venv
	$(BIN)/fastlibra bench cache --adapters 1000 --kv-blocks 100000 --json bench-cache.json

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .hypothesis bench-*.json
	find . \( -path ./.git -o -path ./.venv \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
