# The single place where fdqueue's commands are defined; CI and people call these targets.
# Every target bootstraps .venv on first use, so a fresh clone needs nothing but `make`.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.DEFAULT_GOAL := help
.PHONY: help install test lint fmt typecheck check run clean check-units bench bench-quick chaos

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    echo "python3-venv missing: installing it with apt-get"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv with fdqueue and its development tools

test: $(STAMP) ## run the test suite (on DATABASE_URL's server when set, else an embedded PostgreSQL)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check src tests tools
	$(BIN)/ruff format --check src tests tools

fmt: $(STAMP) ## format and auto-fix
	$(BIN)/ruff format src tests tools
	$(BIN)/ruff check --fix src tests tools

typecheck: $(STAMP) ## mypy --strict over src and tests
	$(BIN)/mypy

check: lint typecheck test ## everything CI runs before the unit checks

run: $(STAMP) ## start the whole system locally (embedded PostgreSQL + Freshdesk simulator unless configured)
	$(BIN)/fdqueue dev $(RUN_ARGS)

bench: $(STAMP) ## benchmarks against baselines of the same run (~8 min; writes docs/benchmarks.md)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python -m tools.bench $(BENCH_ARGS)

bench-quick: $(STAMP) ## the benchmarks in short rounds (under 2 min; writes .fdqueue/bench/)
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	$(BIN)/python -m tools.bench --quick $(BENCH_ARGS)

chaos: $(STAMP) ## fault scenarios against real processes, under 15 minutes (CHAOS_ARGS=--quick)
	$(BIN)/python -m pip install --quiet -e '.[chaos]'
	$(BIN)/python -m tools.chaos $(CHAOS_ARGS)

check-units: ## verify the systemd units (systemd-analyze verify + security)
	bash systemd/check-units.sh

clean: ## remove the virtualenv, caches and local run data
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .fdqueue dist build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
