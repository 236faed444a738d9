#!/usr/bin/env bash
# Boots the Vagrant VM on one of Debian 12's kernels (or Debian 11's 5.10) and runs
# the kernel-focused part of the test suite inside it, then destroys the VM.
#
#   scripts/vm_test.sh 6.1|6.12|5.10   (make vm-test KERNEL=6.1|6.12|5.10)
#
# Needs the box from scripts/vm_box.sh.  libvirtd and virtlogd are started by
# hand when none runs (and stopped again, by PID, at the end); the VM runs under
# QEMU's software emulation (the box's own Vagrantfile) on an isolated management
# network of its own (no route out: the box carries every Debian package and
# Python wheel), provisions with scripts/setup.sh, and runs VM_TESTS (default
# below: capture, fast paths, kernel counters, zero trust, upgrade handover, an L7
# smoke, iptables mode).  The pytest log and a summary with wall times land in
# build/vm/<kernel>/; docs/kernels.md records them.
#
# What it makes it removes, also when it fails or is interrupted: the VM, the
# libvirt domain, network and volumes named after this kernel (box upload, disk),
# a storage pool vagrant-libvirt defined, Vagrant's state, and libvirtd/virtlogd
# if it started them (with the empty LIBVIRT_* iptables chains libvirtd leaves).
# A run first removes what a killed run of the same kernel left.
set -euo pipefail

VM_SCRIPT=vm_test
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/vm_host.sh
. "$REPO/scripts/vm_host.sh"

KERNEL="${1:-${KERNEL:-6.1}}"
OUT="$REPO/build/vm/$KERNEL"
vagrant box list 2>/dev/null | grep -q "^nodeproxy/bookworm-$KERNEL " ||
    vm_die "no box nodeproxy/bookworm-$KERNEL: run make vm-box KERNEL=$KERNEL"
[ "$(id -u)" -eq 0 ] || vm_die "run as root (libvirt)"

# Kernel-focused and bounded (everything runs 5-11x slower under emulation):
# the bulk and many-connection variants stay on the host.
DEFAULT_TESTS=(
    "tests/integration/test_capture.py::test_same_node_vip_100mb_both_ways_and_kernel_counters_match"
    "tests/integration/test_capture.py::test_ipv6_vip_same_and_cross_node"
    "tests/integration/test_capture.py::test_destination_sees_the_client_pod_ip_not_the_proxy"
    "tests/integration/test_capture.py::test_getpeername_shows_the_vip_the_app_dialled"
    "tests/integration/test_capture.py::test_unenrolled_pods_are_untouched"
    "tests/integration/test_capture.py::test_identity_free_deny_is_refused_at_connect_in_the_source_pod"
    "tests/integration/test_capture.py::test_the_capture_mode_is_the_one_configured"
    "tests/integration/test_splice.py::test_kernel_counters_equal_the_bytes_the_kernel_moved"
    "tests/integration/test_splice.py::test_a_flow_taken_back_mid_stream_continues_intact"
    "tests/integration/test_splice.py::test_inbound_plaintext_flows_are_spliced"
    "tests/integration/test_msg_redirect.py::test_kernel_byte_counters_still_equal_the_application_bytes"
    "tests/integration/test_msg_redirect.py::test_ipv6_connections_take_the_fast_path"
    "tests/integration/test_upgrade.py"
    "tests/integration/test_zero_trust.py::test_traffic_between_nodes_is_encrypted"
    "tests/integration/test_zero_trust.py::test_destination_sees_each_client_identity"
    "tests/integration/test_zero_trust.py::test_identity_free_deny_is_refused_in_the_kernel"
    "tests/integration/test_http.py::test_l7_authorization_by_path_method_and_identity"
    "tests/integration/test_http.py::test_websocket_upgrade"
    "tests/integration/test_http.py::test_http2_prior_knowledge_to_an_http1_backend"
    "tests/integration/test_iptables_mode.py"
)
read -r -a TESTS <<<"${VM_TESTS:-${DEFAULT_TESTS[*]}}"
TEST_TIMEOUT="${VM_TEST_TIMEOUT:-900}"     # per test, inside the VM
SLOWDOWN="${VM_SLOWDOWN:-5}"               # NODEPROXY_TESTBED_SLOWDOWN: every testbed
                                           # and wait_for bound times this
RUN_TIMEOUT="${VM_RUN_TIMEOUT:-3600}"      # the whole pytest run (then SIGINT: pytest
                                           # still prints what passed and failed)

export VAGRANT_CWD="$REPO/vagrant"
export VAGRANT_DOTFILE_PATH="$OUT/vagrant"   # one VM state per kernel, outside vagrant/
export VAGRANT_DEFAULT_PROVIDER=libvirt
export NODEPROXY_BOX="nodeproxy/bookworm-$KERNEL"
export NODEPROXY_KEEP_KERNEL=1              # the point is this kernel, not backports'
export NODEPROXY_VM_PREFIX="nodeproxy-vm-$KERNEL-"  # one libvirt domain per kernel
export NODEPROXY_VM_NETWORK="nodeproxy-vm-$KERNEL"  # its isolated management network
# Everything libvirt holds for this kernel's run: domain, network, box upload, disk.
OURS="^(nodeproxy-vm-${KERNEL//./\\.}(-|$)|nodeproxy-VAGRANTSLASH-bookworm-${KERNEL//./\\.}_vagrant_box_image_)"
SUMMARY="$OUT/summary.txt"
LOG="$OUT/pytest.log"
mkdir -p "$OUT"

now() { date +%s; }
: >"$SUMMARY"
note() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }
T_START=$(now)

remove_vm() {
    if [ -d "$VAGRANT_DOTFILE_PATH" ]; then
        vm_say "vagrant destroy -f"
        vagrant destroy -f >/dev/null 2>&1 || vagrant destroy -f || true
    fi
    vm_remove_libvirt_objects "$OURS"
    rm -rf "$VAGRANT_DOTFILE_PATH"
}

finish() {
    local rc=$? t
    set +e
    trap - INT TERM
    t=$(now)
    remove_vm
    vm_stop_libvirt
    note "teardown: $(($(now) - t)) s; whole run: $(($(now) - T_START)) s (exit $rc)"
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

vm_install_host_packages
vm_configure_qemu_user
vm_start_libvirt
remove_vm   # what a killed run of this kernel left behind

t0=$(now)
vm_say "vagrant up (box $NODEPROXY_BOX, kernel and setup provisioners)"
# The volume upload's progress is one \r-separated line of thousands of updates: drop it.
vagrant up --provider=libvirt --no-provision nodeproxy 2>&1 | tr '\r' '\n' | grep --line-buffered -v 'Progress: '
t1=$(now)
note "boot to ssh: $((t1 - t0)) s"
vagrant provision nodeproxy --provision-with kernel,setup
t2=$(now)
note "provisioning (scripts/setup.sh in the VM): $((t2 - t1)) s"
note "kernel: $(vagrant ssh nodeproxy -c 'uname -r' 2>/dev/null | tr -d '\r')"
t=$(now)
vagrant ssh nodeproxy -c 'cd /nodeproxy && sudo .venv/bin/nodeproxy check' 2>&1 |
    tr -d '\r' | tee "$OUT/check.txt" || true
note "nodeproxy check: $(($(now) - t)) s"

vm_say "pytest in the VM: ${#TESTS[@]} selections, up to ${RUN_TIMEOUT}s"
t2=$(now)
set +e
vagrant ssh nodeproxy -c "cd /nodeproxy && sudo PYTHONUNBUFFERED=1 NODEPROXY_TESTBED_SLOWDOWN=${SLOWDOWN} timeout -s INT -k 120 ${RUN_TIMEOUT} .venv/bin/pytest -v -rfE \
    -p no:cacheprovider --timeout=${TEST_TIMEOUT} --durations=15 ${TESTS[*]}" 2>&1 |
    sed -u 's/\r$//' | tee "$LOG"
rc=${PIPESTATUS[0]}
set -e
t3=$(now)
note "test run: $((t3 - t2)) s (pytest exit $rc)"
note "pytest: $(grep -E '^=+ .*(passed|failed|error).* in ' "$LOG" | tail -n 1 | tr -d '=')"
vm_say "summary in $SUMMARY"
exit "$rc"
