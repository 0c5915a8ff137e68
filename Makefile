# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup clean

$(STAMP): setup.py pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, pinned: an unpinned torch would pull a several-GB CUDA build onto a machine without a GPU.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,hf,plots]"
	# The engines the plug-ins are tested against (tests/test_integrations*.py): their released code without
	# their GPU dependencies (--no-deps; pip reports their unmet pins, harmless here), plus the light packages
	# that importing their EPLB and plug-in modules needs.
	$(BIN)/pip install -q --no-deps sglang==0.5.23 vllm==0.33.0
	$(BIN)/pip install -q orjson psutil pybase64 requests starlette msgspec pyzmq ipython aiohttp cbor2 openai openai-harmony
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/moeless demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider --benchmark-disable tests bench

bench: $(STAMP)
	$(BIN)/python -m pytest -q bench --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
