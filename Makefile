# `make test` and `make demo` bootstrap .venv on a fresh machine; nothing else is needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast demo bench venv clean browser screenshots docs

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

# The layers first (import-linter: imports point down, pyproject.toml), then the tests on two workers
# (pytest-xdist): most tests run one single-threaded process, so two at once use both cores of a
# 2-core machine. worksteal: a worker that runs out of tests takes the other's pending ones, so the two end together.
test: $(STAMP) browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist worksteal

# The edit-test loop: everything but the tests marked slow.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal -m "not slow"

# The report's test opens it in Debian's headless Chromium (driven through playwright, no browser download).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# docs/configuration.md from the config's schema, and the README's table of bases from the registry (a test fails
# when either is stale).
docs: $(STAMP)
	$(BIN)/python -m lookalike.generated_docs docs/configuration.md README.md

# The README's pictures, taken by the browser tests that show those pages.
screenshots: $(STAMP) browser
	mkdir -p docs/images
	LOOKALIKE_SCREENSHOTS=docs/images $(BIN)/python -m pytest -q tests/test_studio.py -k browser

demo: $(STAMP)
	$(BIN)/python -m lookalike.data.sample_subject work/quickstart/photos
	$(BIN)/lookalike run configs/quickstart.toml

bench: $(STAMP)
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/evaluate.py
	$(BIN)/python bench/prepare.py
	$(BIN)/python bench/sweep.py

clean:
	rm -rf $(VENV) work
