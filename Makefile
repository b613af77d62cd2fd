# The README's two commands: `make train` (set up, train LeNet-5 on Fashion-MNIST) and `make test`.
PYTHON ?= python3
VENV ?= .venv
EPOCHS ?= 10
OUT ?= runs/lenet5-fashion-mnist

.PHONY: train test install dataset bench clean

$(VENV)/bin/python:
	@PYTHON=$(PYTHON) bash .ci/system-packages.sh
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

install: $(VENV)/bin/python
	$(VENV)/bin/pip install -q ".[plot]"

# System packages (compiler, Python headers, venv) and real Fashion-MNIST from Debian when we may
# install them; otherwise training uses the Fashion-MNIST sample shipped in the package.
dataset:
	@PYTHON=$(PYTHON) bash .ci/system-packages.sh

train: dataset install
	@if [ -d /usr/share/datasets/fashion-mnist ]; then data=fashion-mnist; else data=fashion-mnist-sample; fi; \
	$(VENV)/bin/cnnx train --model lenet5 --dataset $$data --epochs $(EPOCHS) --out $(OUT)

test:
	bash .ci/run

bench: install
	$(VENV)/bin/python benchmarks/run.py

clean:
	rm -rf build dist *.egg-info .ci-work cnnx/*.so cnnx/_ops.c
