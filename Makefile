# Two commands matter: `make serve` and `make test`. Everything else is reached through them.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8080

.PHONY: install serve test test-all test-integration bench gpu-check gpu-wheels proto clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	DETSERVE_DEFAULT_MODEL=rtmdet $(BIN)/detserve serve --model-store models

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q -m integration

bench: $(STAMP)
	$(BIN)/detserve bench report --out docs/benchmarks.md

# On a GPU machine, in under 8 minutes: gpu tests, TensorRT/CUDA/eager-CUDA parity, a short benchmark; one table.
gpu-check: $(STAMP)
	$(BIN)/python -m service.gpucheck

# For a GPU machine with torch but no network: the serving stack's wheels for its Python, into .whl/.
# There: python3 -m service.gpucheck --wheels .whl
gpu-wheels: $(STAMP)
	$(BIN)/python -m service.gpucheck --fetch-wheels .whl

proto: $(STAMP)
	$(BIN)/python -m service.protocols.grpc.generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
