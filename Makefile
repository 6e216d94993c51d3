# Set-up and the two commands of the README: `make demo` and `make test`.
# Everything a fresh machine needs is installed here, into .venv, with pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-slow test-gpu lint demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch and torchvision as a matching pair (PyPI's torchvision does not import beside
	# other torch builds); pip takes them from the machine's local wheel store when present.
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[dev]"
	# the browser of the app's tests (tests/test_app.py): Debian's chromium, driven by
	# Playwright through its executable path; without it those tests are skipped
	command -v chromium >/dev/null || apt-get install -y chromium \
		|| (apt-get update && apt-get install -y chromium) \
		|| echo "could not install chromium (apt-get, as root): the browser tests of cait app will be skipped"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu

lint: $(STAMP)
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/ruff check src tests

DEMO := runs/demo

# Train a small CaiT on the bundled digits (CPU, a few minutes), predict a few test images,
# then evaluate on the 360-image test split: the last line printed is the top-1. Run again,
# it continues an interrupted demo (--resume auto) and retrains nothing once it finished.
demo: $(STAMP)
	$(PY) -m cait train --recipe recipes/digits.yaml --data digits --output $(DEMO) --no-progress --resume auto
	$(PY) -c "from cait.data import export_digits; export_digits('$(DEMO)/samples', count=4)"
	$(PY) -m cait predict --checkpoint $(DEMO)/model.safetensors $(DEMO)/samples/*.png --topk 3
	@echo "demo outputs in $(DEMO)/: model.safetensors, model_ema.safetensors, best.pt, last.pt, config.yaml, metrics.jsonl, curves.png, tensorboard/, samples/"
	$(PY) -m cait eval --checkpoint $(DEMO)/model.safetensors --data digits

clean:
	rm -rf $(VENV) runs .pytest_cache
