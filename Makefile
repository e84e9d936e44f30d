# The two commands the README opens with. Both install what they need into .venv first.
SHELL := /bin/bash
HOST ?= 127.0.0.1
PORT ?= 8000
TCMALLOC := $(firstword $(wildcard /usr/lib/*/libtcmalloc_minimal.so.4))

.PHONY: run test setup

setup:
	@scripts/setup.sh

run: setup
	LD_PRELOAD=$(TCMALLOC) .venv/bin/cxr serve --host $(HOST) --port $(PORT)

# The dependency rules (import-linter, contracts in pyproject.toml) and ruff first: seconds, and they
# name the offending import or line before the long test run starts.
test: setup
	.venv/bin/lint-imports
	.venv/bin/ruff check
	LD_PRELOAD=$(TCMALLOC) .venv/bin/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)
