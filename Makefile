# Two commands for a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
GEN_DIR := clients/python/src
PROTO := protos/ledger/v1/ledger.proto
LEDGER ?= demo
DIST ?= dist

.PHONY: venv run dist test lint typecheck generate check-generated contract proto-image node-deps ts-deps pytest clean bench bench-quick

## The dev environment in .venv: the server and client editable, tools (grpcurl, buf) in .venv/bin.
venv: $(STAMP)

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e clients/python -e '.[dev]'
	touch $(STAMP)

## Serve on the embedded SQLite database (or $$LEDGER_DATABASE_URL), demo ledger ready.
run: venv
	$(BIN)/ledger-service migrate
	$(BIN)/ledger-service init-counter --ledger $(LEDGER)
	@addr=$${LEDGER_LISTEN:-127.0.0.1:50051}; printf '%s\n' '' \
	  "Serving on $$addr (Ctrl-C stops). Try, from $(CURDIR) in another terminal:" \
	  "  $(BIN)/grpcurl -plaintext $$addr list" \
	  "  $(BIN)/grpcurl -plaintext -emit-defaults -d '{\"ledger\": \"$(LEDGER)\", \"idempotency_key\": \"k1\", \"debit_account\": \"cash\", \"credit_account\": \"sales\", \"amount\": \"1250\", \"asset\": \"USD\"}' $$addr ledger.v1.LedgerService/PostEntry" \
	  "  $(BIN)/grpcurl -plaintext -emit-defaults -d '{\"ledger\": \"$(LEDGER)\"}' $$addr ledger.v1.LedgerService/StreamEntries" \
	  "Every RPC: README.md, 'Trying it with grpcurl and buf curl'; the contract: $(PROTO); docs/." ''
	$(BIN)/ledger-service serve

## Both wheels, ledger-client and ledger-service, into $(DIST)/: `pip install
## --find-links $(DIST) ledger-service` takes both from there (no index needed for them).
# Each project builds in a temporary directory of its own (DIST_EXTRA_CONFIG):
# a shared or stale build/lib would put one project's files into the other's wheel.
dist: venv
	@rm -f $(DIST)/ledger_client-*.whl $(DIST)/ledger_service-*.whl
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for project in clients/python .; do \
	  work=$$(mktemp -d "$$tmp/build.XXXX"); \
	  printf '[build]\nbuild_base = %s\n[egg_info]\negg_base = %s\n' "$$work" "$$work" > "$$work/setup.cfg"; \
	  DIST_EXTRA_CONFIG="$$work/setup.cfg" $(BIN)/pip wheel --quiet --no-deps --no-build-isolation \
	    --wheel-dir $(DIST) $$project; \
	done
	@ls $(DIST)/ledger_client-*.whl $(DIST)/ledger_service-*.whl

## Everything CI checks: lint, types, contract, generated stubs, then the tests.
test: venv lint typecheck contract check-generated pytest

## ruff check and ruff format --check on everything.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## mypy, strict (files and settings in pyproject.toml).
typecheck: venv
	$(BIN)/mypy

## The contract: buf lint (STANDARD), formatting, and no breaking change
## against the released image protos/ledger.v1.binpb, which must be current.
contract: venv
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code protos
	$(BIN)/buf breaking --against protos/ledger.v1.binpb
	@tmp=$$(mktemp) && $(BIN)/buf build -o $$tmp && \
	cmp -s $$tmp protos/ledger.v1.binpb \
	  || { echo "protos/ changed (compatibly): run 'make proto-image' and commit the image"; rm -f $$tmp; exit 1; }; \
	rm -f $$tmp

## Record the contract as released (after review of an additive change).
proto-image: venv
	$(BIN)/buf breaking --against protos/ledger.v1.binpb
	$(BIN)/buf build -o protos/ledger.v1.binpb

NODE_INTEROP := tests/interop/node

# npm ci in $(1). Without npm (a machine with only Python) the Node and
# TypeScript tests skip with a message; under CI=true npm is required.
define npm_ci
	@if command -v npm >/dev/null 2>&1; then \
	  cd $(1) && npm ci --no-audit --no-fund --loglevel=error; \
	elif [ "$$CI" = "true" ]; then \
	  echo "npm is required under CI=true ($(1))"; exit 1; \
	else \
	  echo "npm not found: skipping $(1) (its tests will skip)"; \
	fi
endef

## Node packages of the interop tests, from the committed lockfile.
node-deps: $(NODE_INTEROP)/node_modules/.package-lock.json

$(NODE_INTEROP)/node_modules/.package-lock.json: $(NODE_INTEROP)/package-lock.json
	$(call npm_ci,$(NODE_INTEROP))

## The tests alone: unit, integration (Postgres, SQLite) and end-to-end.
pytest: venv node-deps ts-deps
	$(BIN)/pytest

TS_DIR := clients/typescript
TS_GEN := $(TS_DIR)/src/gen
# protoc-gen-es from the TypeScript package's pinned devDependencies: a local
# plugin, no remote generation.
PROTOC_GEN := PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	--plugin=protoc-gen-es=$(TS_DIR)/node_modules/.bin/protoc-gen-es

## TypeScript client packages (and protoc-gen-es), from the committed lockfile.
ts-deps: $(TS_DIR)/node_modules/.package-lock.json

$(TS_DIR)/node_modules/.package-lock.json: $(TS_DIR)/package-lock.json
	$(call npm_ci,$(TS_DIR))

## Regenerate the committed stubs from protos/ (never edit them by hand).
generate: venv ts-deps
	$(PROTOC_GEN) --python_out=$(GEN_DIR) --mypy_out=$(GEN_DIR) \
	  --grpc_python_out=$(GEN_DIR) --mypy_grpc_out=$(GEN_DIR) $(PROTO)
	$(PROTOC_GEN) --es_out=$(TS_GEN) --es_opt=target=ts $(PROTO)

## Fails when the committed stubs differ from what protos/ generates now.
check-generated: venv ts-deps
	@tmp=$$(mktemp -d) && mkdir $$tmp/py $$tmp/ts && \
	$(PROTOC_GEN) --python_out=$$tmp/py --mypy_out=$$tmp/py --grpc_python_out=$$tmp/py \
	  --mypy_grpc_out=$$tmp/py $(PROTO) && \
	diff -r -x __init__.py -x __pycache__ $$tmp/py/ledger/v1 $(GEN_DIR)/ledger/v1 && \
	if [ -x $(TS_DIR)/node_modules/.bin/protoc-gen-es ]; then \
	  $(PROTOC_GEN) --es_out=$$tmp/ts --es_opt=target=ts $(PROTO) && diff -r $$tmp/ts $(TS_GEN); \
	else echo "protoc-gen-es not installed: TypeScript stubs not checked"; [ "$$CI" != "true" ]; fi \
	  || { echo "generated stubs are stale: run 'make generate' and commit"; rm -rf $$tmp; exit 1; }; \
	rm -rf $$tmp

## Remove the venv, caches, the embedded database, node_modules and dist/.
clean:
	rm -rf $(VENV) $(DIST) .mypy_cache .pytest_cache .ruff_cache ledger.sqlite3* $(NODE_INTEROP)/node_modules $(TS_DIR)/node_modules $(TS_DIR)/dist

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

## Benchmark against baselines (docs/BENCHMARKS.md); `make bench-quick` is the smoke run.
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --quick
