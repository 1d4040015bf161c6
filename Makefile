# Two commands for a newcomer: `make dev` runs the whole local stack, `make test` the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
STAMP := $(VENV)/.installed
# The dashboard's browser tests drive Debian's chromium (Playwright's own download is not reachable).
CHROMIUM := /usr/bin/chromium

.PHONY: dev test lint lint-template deploy bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml layers/core/pyproject.toml clients/first-auth/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e layers/core -e clients/first-auth -e .
	touch $(STAMP)

# Installed when missing: as root (CI on a fresh Debian machine) or through sudo; elsewhere the
# browser tests are skipped, saying so.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
		echo "make: no $(CHROMIUM) and no root: the browser tests will be skipped (apt-get install chromium)" >&2; \
	fi

dev: $(STAMP)
	$(BIN)/first-gateway dev --port $(PORT) $(ARGS)

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# template.yaml alone (tests/infra runs it too, with the rest of the deploy checks).
lint-template: $(STAMP)
	$(BIN)/cfn-lint -t template.yaml --include-checks I

# Deploy to AWS: make deploy STAGE=dev (infra/OPERATOR.md first).
deploy: $(STAMP)
	@test -n "$(STAGE)" || { echo "usage: make deploy STAGE=dev|prod" >&2; exit 2; }
	infra/deploy $(STAGE)

bench: $(STAMP)
	$(BIN)/python bench/latency.py

clean:
	rm -rf $(VENV)
