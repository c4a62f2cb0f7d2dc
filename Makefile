# `make run` starts the whole cluster on this machine; `make test` runs every test.
# Both create .venv and install what they need on first use (`make install` does only that).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install run test lint format bench clean browser-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# The one-machine layout of deploy/cluster.env in the foreground, every log on stdout;
# Ctrl-C stops it. deploy/ctl status, deploy/status and deploy/reload-workers work on it.
run: $(STAMP)
	CHAT_FOREGROUND=1 deploy/run all

# Debian's chromium for the browser tests (never a browser download). Needs root;
# without it the browser tests are skipped with the reason.
browser-deps:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	   apt-get install -y -qq --no-install-recommends chromium >/dev/null)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: $(STAMP) browser-deps lint
	$(PY) -m pytest

# The benchmark: starts its own clusters on loopback, prints a table and JSON lines.
# `make bench ARGS="--quick"` for a one-minute check; see bench/README.md.
bench: $(STAMP)
	$(PY) -m bench $(ARGS)

clean:
	rm -rf $(VENV) run logs .pytest_cache .ruff_cache tests/output bench/output
