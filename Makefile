# nodeproxy developer entry points.  Everything runs as root on Debian 12;
# `make setup` is idempotent and every other target runs it first.
.PHONY: all setup test lint demo bench fresh-check ci clean

VENV := .venv
SHELL := /bin/bash

all: test

setup:
	bash scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check nodeproxy tests

# pytest's own exit status decides: any failure, and also 5 (no tests collected),
# fails the target.
test: setup
	$(VENV)/bin/ruff check nodeproxy tests
	$(VENV)/bin/pytest -v

demo: setup
	$(VENV)/bin/nodeproxy demo

# Prove that scripts/setup.sh sets up a fresh machine: a minimal Debian 12 root from
# Debian's archive, setup.sh, `nodeproxy check` and `make demo` inside it (chroot on
# this kernel).  Needs no `make setup` here; see docs/install.md.
fresh-check:
	bash scripts/fresh_check.sh

# What CI runs (.ci/run): the fresh-machine check, then the whole suite; both always
# run, and either failing fails the target.
ci:
	@status=0; \
	$(MAKE) --no-print-directory fresh-check || status=$$?; \
	$(MAKE) --no-print-directory test || status=$$?; \
	exit $$status

# The full benchmark suite (about 12 minutes on 2 cores); see docs/benchmarks.md.
bench: setup
	$(VENV)/bin/nodeproxy bench --json bench-results/latest.json --markdown bench-results/latest.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find nodeproxy tests -name __pycache__ -type d -prune -exec rm -rf {} +
