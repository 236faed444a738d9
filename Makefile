# nodeproxy developer entry points.  Everything runs as root on Debian 12;
# `make setup` is idempotent and every other target runs it first.
.PHONY: all setup test lint demo bench fuzz clean

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

# Coverage-guided fuzzing (docs/fuzzing.md): each target for FUZZ_SECONDS, one after the
# other, niced; new inputs and any crash go to fuzz-artifacts/<target>/ (ignored by git).
# Fails if any target found something.  FUZZ_TARGETS=fuzz_h2_server picks targets.
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= fuzz_h1_server fuzz_h2_server fuzz_hbone_server fuzz_config_loader \
	fuzz_cni_netconf fuzz_authorization
fuzz: setup
	@status=0; for target in $(FUZZ_TARGETS); do \
		out=fuzz-artifacts/$$target; mkdir -p $$out/corpus; \
		echo "fuzz: $$target for $(FUZZ_SECONDS) s (log: $$out/log)"; \
		nice -n 10 $(VENV)/bin/python -m tests.fuzz.run $$target \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=$$out/ $$out/corpus tests/fuzz/corpus/$$target \
			>$$out/log 2>&1 || { status=1; echo "fuzz: $$target FOUND A CRASH:"; \
			ls $$out/crash-* $$out/timeout-* $$out/oom-* 2>/dev/null; }; \
		grep -E "^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|average_exec_per_sec)" \
			$$out/log | sed 's/^/    /'; \
	done; exit $$status

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find nodeproxy tests -name __pycache__ -type d -prune -exec rm -rf {} +
