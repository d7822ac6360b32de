# FreshRec developer targets. Every target sets up what it needs; CI calls the same ones.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.freshrec-installed
PROTO_SRC := $(wildcard protos/freshrec/v1/*.proto)
PROTO_OUT := freshrec/v1/ranking_pb2.py freshrec/v1/updater_pb2.py freshrec/v1/catalog_pb2.py

.DEFAULT_GOAL := help
.PHONY: help setup proto demo test unit integration chaos lint bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel on this disk. Unpinned, pip pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) $(PROTO_OUT) ## create .venv and install torch==2.13.0, then the project

$(PROTO_OUT): $(PROTO_SRC) | $(STAMP)
	PATH=$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=. --pyi_out=. --grpc_python_out=. --mypy_grpc_out=. \
		$(PROTO_SRC)
	@touch $(PROTO_OUT)

proto: $(STAMP) ## regenerate gRPC stubs from protos/ (never edit generated code)
	@rm -f $(PROTO_OUT)
	@$(MAKE) --no-print-directory $(PROTO_OUT)

demo: setup ## run the whole loop end to end (MovieLens-100k; DATASET=synthetic for the shop)
	$(BIN)/freshrec demo --dataset $${DATASET:-ml100k}

test: setup ## unit + integration tests (starts its own redis-server); not tests/chaos
	$(BIN)/python -m pytest tests/unit tests/integration

unit: setup ## unit tests only (no network)
	$(BIN)/python -m pytest tests/unit

integration: setup ## integration tests (real Redis, Feast, gRPC)
	$(BIN)/python -m pytest tests/integration

chaos: setup ## long fault/load tests: hot swap under 10k calls, updater SIGKILLed 24 times
	$(BIN)/python -m pytest tests/chaos -m chaos -s

lint: setup ## ruff + mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: setup ## serving latency benchmark, JSON on the last line
	$(BIN)/freshrec bench serving --json

clean: ## remove run-time state (keeps .venv)
	rm -rf .freshrec .pytest_cache .mypy_cache .ruff_cache
