# nodeproxy developer entry points.  Everything runs as root on Debian 12;
# `make setup` is idempotent and every other target runs it first.
.PHONY: all setup test lint demo bench clean vm-box vm-test

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

# The full benchmark suite (about 12 minutes on 2 cores); see docs/benchmarks.md.
bench: setup
	$(VENV)/bin/nodeproxy bench --json bench-results/latest.json --markdown bench-results/latest.md

# The Vagrant VM on one of Debian 12's kernels (QEMU software emulation; see
# docs/kernels.md).  vm-box builds the box from Debian's packages; vm-test boots
# it, provisions it and runs the kernel-focused tests inside, then destroys it.
KERNEL ?= 6.1
vm-box:
	bash scripts/vm_box.sh $(KERNEL)

vm-test: vm-box
	bash scripts/vm_test.sh $(KERNEL)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find nodeproxy tests -name __pycache__ -type d -prune -exec rm -rf {} +
