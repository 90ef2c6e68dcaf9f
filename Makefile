# `make test` and `make demo` bootstrap .venv on a fresh machine; nothing else is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The torch release that this machine serves from its own disk (others are multi-GB downloads).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	# facenet-pytorch pins torch<2.3, numpy<2 and Pillow<10.3; it works with the newer ones, so skip its pins.
	$(BIN)/pip install --quiet --no-deps facenet-pytorch==2.6.0
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m lookalike.data.sample_subject work/quickstart/photos
	$(BIN)/lookalike run configs/quickstart.toml

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) work
