# The README's two commands: `make train` (set up, train LeNet-5 on Fashion-MNIST) and `make test`.
PYTHON ?= python3
VENV ?= .venv
EPOCHS ?= 3
OUT ?= runs/lenet5-fashion-mnist

.PHONY: train test install dataset bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

install: $(VENV)/bin/python
	$(VENV)/bin/pip install -q ".[plot]"

# Real Fashion-MNIST from Debian when we may install packages; otherwise the sample in the package.
dataset:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || echo "note: could not install dataset-fashion-mnist; training on the embedded sample"; \
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null \
	  || echo "note: could not install dataset-fashion-mnist; training on the embedded sample"; \
	else echo "note: no root to apt-get install dataset-fashion-mnist; training on the embedded sample"; fi

train: install dataset
	@if [ -d /usr/share/datasets/fashion-mnist ]; then data=fashion-mnist; else data=fashion-mnist-sample; fi; \
	$(VENV)/bin/cnnx train --model lenet5 --dataset $$data --epochs $(EPOCHS) --out $(OUT)

test:
	bash .ci/run

bench: install
	$(VENV)/bin/python benchmarks/run.py

clean:
	rm -rf build dist *.egg-info .ci-work cnnx/*.so cnnx/_ops.c
