# Two commands do all the set-up on a fresh machine:
#   make run   - create .venv, install the CPU PyTorch wheel then sepconv[experiment], and run the `sepconv` command
#   make test  - same environment plus the test extras (which include the experiment, eeg and bench extras), then the
#                whole test suite
# torch==2.13.0 is installed before the package so that pip never resolves a CUDA build of torch.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: run test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[experiment]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/sepconv $(ARGS)

test: $(VENV)/.installed-test
	KERAS_BACKEND=torch $(BIN)/python -m pytest $(PYTEST_ARGS)

# make bench - `sepconv bench --suite $(ARGS)`: the depthwise layer suite; ARGS="separable" the separable one, ARGS
#              adds options (ARGS="--quick --train"); other suites: make run ARGS="bench --models ..."
bench: $(VENV)/.installed-run
	$(BIN)/sepconv bench --suite $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
