# nodeproxy developer entry points.  Everything runs as root on Debian 12;
# `make setup` is idempotent and every other target runs it first.
.PHONY: all setup test lint demo bench fuzz fresh-check ci cni-plugin image clean vm-box vm-test native pure

VENV := .venv
SHELL := /bin/bash

all: test

setup:
	bash scripts/setup.sh

# The L7 request path compiled with mypyc, in place (nodeproxy/native.py, setup.py): what
# `pip install` builds, rebuilt after editing one of those modules (the daemon and the
# tests use pure Python while the build is older than the sources).  `make pure` removes
# it; NODEPROXY_NATIVE=0 runs pure Python beside it.
native: setup
	nice -n 10 $(VENV)/bin/python setup.py -q build_ext --inplace

pure:
	rm -f nodeproxy/_native__mypyc*.so nodeproxy/_native_build.json
	find nodeproxy -name '*.cpython-*.so' -delete

lint: setup
	$(VENV)/bin/ruff check nodeproxy nodeproxy_dev tests

# pytest's own exit status decides: any failure, and also 5 (no tests collected),
# fails the target.  The whole suite runs with the compiled L7 path (when the install
# built it: nodeproxy/native.py), then the unit tests again as pure Python
# (NODEPROXY_NATIVE=0), the path a machine without a compiler runs.
test: setup
	$(VENV)/bin/ruff check nodeproxy nodeproxy_dev tests
	$(VENV)/bin/pytest -v
	NODEPROXY_NATIVE=0 $(VENV)/bin/pytest -q tests/unit

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

# nodeproxy-cni as one static executable (no python3 on the node); docs/install.md.
CNI_PLUGIN := build/nodeproxy-cni
CNI_SOURCES := $(wildcard nodeproxy/cni/*.py) nodeproxy/admin/control_client.py nodeproxy/__init__.py \
	nodeproxy/native.py
cni-plugin: $(CNI_PLUGIN)
$(CNI_PLUGIN): $(CNI_SOURCES) scripts/build-cni-plugin.sh pyproject.toml | setup
	$(VENV)/bin/python -c 'import PyInstaller, staticx' 2>/dev/null || \
		$(VENV)/bin/pip install --disable-pip-version-check -q -e '.[build]'
	nice -n 10 bash scripts/build-cni-plugin.sh $@ $(VENV)/bin/python

# The DaemonSet's image from Debian's packages (mmdebstrap + podman), as an OCI
# archive: build/nodeproxy-image.tar; docs/install.md.  Needs no venv (no setup).
image:
	bash scripts/build-image.sh

# The Vagrant VM on one of Debian 12's kernels (QEMU software emulation; see
# docs/kernels.md).  vm-box builds the box from Debian's packages; vm-test boots
# it, provisions it and runs the kernel-focused tests inside, then destroys it.
KERNEL ?= 6.1
vm-box:
	bash scripts/vm_box.sh $(KERNEL)

vm-test: vm-box
	bash scripts/vm_test.sh $(KERNEL)

# build/ holds the image build's own container store (overlay layers): podman
# removes it (rm alone can trip on files its user namespace owns).
clean:
	if [ -d build/containers ]; then \
		podman --root $(CURDIR)/build/containers/root --runroot $(CURDIR)/build/containers/run \
			--storage-driver overlay system reset -f; \
	fi
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
	find nodeproxy nodeproxy_dev tests -name __pycache__ -type d -prune -exec rm -rf {} +
