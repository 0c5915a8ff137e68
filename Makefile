# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench setup clean compile-check gpu-wheels

$(STAMP): setup.py pyproject.toml
	@# the environment takes about 4 GB (torch, two Tritons, the engines); pip reports a disk that fills up
	@# mid-download as a dropped connection ("Connection interrupted ... incomplete-download"), so say it first
	@$(PY) -c "import shutil; f = shutil.disk_usage('.').free / 2**30; f < 6 and print(f'WARNING: {f:.1f} GiB free here; the set-up needs about 5 GiB (pip reports a full disk as a dropped connection)')"
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

# A second, compile-only environment with the GPU machine's Triton (no torch): the compile check runs under
# both Triton versions, so a kernel that the interpreter accepts but a GPU compiler rejects fails CI.
TRITON_GPU := 3.6.*
T36 := .venv-triton36
T36_STAMP := $(T36)/.installed

$(T36_STAMP):
	test -x $(T36)/bin/python || $(PY) -m venv $(T36)
	$(T36)/bin/pip install -q "triton==$(TRITON_GPU)"
	touch $(T36_STAMP)

# Every Triton kernel, every launch config the host code can select, sm_90 and sm_80, no GPU needed.
compile-check: $(STAMP) $(T36_STAMP)
	$(BIN)/python bench/compile_check.py
	$(T36)/bin/python bench/compile_check.py

test: $(STAMP) compile-check
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -p no:cacheprovider --benchmark-disable tests bench

bench: $(STAMP)
	$(BIN)/python -m pytest -q bench --benchmark-only

# The wheels bench/gpu_check.sh installs offline on a GPU machine (pure-Python, for Python 3.10 to 3.14):
# carry gpu-wheels/ with the working tree (bench/README.md).
GPU_WHEELS := gpu-wheels
GPU_WHEEL_PACKAGES := pytest pytest-benchmark hypothesis tqdm exceptiongroup tomli typing_extensions

gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	for v in 3.10 3.11 3.12 3.13 3.14; do \
	  $(PY) -m pip download -q --only-binary=:all: --platform any --implementation py --python-version $$v \
	    -d $(GPU_WHEELS) $(GPU_WHEEL_PACKAGES) || exit 1; \
	done
	du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) $(T36) build *.egg-info .pytest_cache .benchmarks $(GPU_WHEELS)
