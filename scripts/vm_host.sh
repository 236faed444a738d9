# shellcheck shell=bash
# Host side of the Vagrant VM (sourced by scripts/vm_box.sh and scripts/vm_test.sh):
# the Debian packages that build and run the box, libvirt's qemu.conf, and
# libvirtd/virtlogd started by hand when no service manager runs them (and
# stopped again, by PID, by whoever started them).

VM_HOST_PACKAGES=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu
    qemu-system-x86 qemu-utils mmdebstrap dnsmasq-base e2fsprogs)
QEMU_CONF=/etc/libvirt/qemu.conf

vm_say() { printf '%s: %s\n' "${VM_SCRIPT:-vm}" "$*"; }
vm_die() { printf '%s: error: %s\n' "${VM_SCRIPT:-vm}" "$*" >&2; exit 1; }

. "$REPO/scripts/lib/apt.sh"

vm_install_host_packages() {
    local missing
    mapfile -t missing < <(apt_missing "${VM_HOST_PACKAGES[@]}")
    if [ "${#missing[@]}" -eq 0 ]; then
        vm_say "host packages: all installed"
        return
    fi
    vm_say "host packages: apt-get install ${missing[*]}"
    apt_install "${missing[@]}"
}

# The box boots its own kernel and initrd (direct kernel boot), which live under
# ~/.vagrant.d of the user that added the box: QEMU must run as that user to read them.
vm_configure_qemu_user() {
    if grep -qE '^user *= *"root"' "$QEMU_CONF" && grep -qE '^group *= *"root"' "$QEMU_CONF"; then
        return
    fi
    vm_say "$QEMU_CONF: user = \"root\", group = \"root\" (QEMU reads the box's kernel files)"
    sed -i -E '/^#? *user *= *"/d; /^#? *group *= *"/d' "$QEMU_CONF"
    printf 'user = "root"\ngroup = "root"\n' >>"$QEMU_CONF"
}

VM_STARTED_PIDS=()
VM_POOLS_BEFORE=""
VM_RUNDIR_NEW=0
_vm_running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
vm_virsh() { virsh -c qemu:///system "$@"; }

# Starts virtlogd and libvirtd unless they already run (under nice: QEMU, which
# libvirtd spawns, inherits it and shares the machine's cores politely).
vm_start_libvirt() {
    [ -e /run/libvirt ] && VM_RUNDIR_NEW=0 || VM_RUNDIR_NEW=1
    if ! _vm_running /run/virtlogd.pid; then
        vm_say "starting virtlogd -d"
        nice -n 19 virtlogd -d
        sleep 0.5
        VM_STARTED_PIDS+=("$(cat /run/virtlogd.pid)")
    fi
    if ! _vm_running /run/libvirtd.pid; then
        vm_say "starting libvirtd -d"
        nice -n 19 libvirtd -d
        local i
        for i in $(seq 1 50); do
            virsh -c qemu:///system version >/dev/null 2>&1 && break
            sleep 0.2
        done
        VM_STARTED_PIDS+=("$(cat /run/libvirtd.pid)")
    fi
    vm_virsh version >/dev/null || vm_die "libvirtd does not answer"
    VM_POOLS_BEFORE="$(vm_virsh pool-list --all --name)"
}

# Removes every libvirt object whose name matches the extended regex $1: domains
# (stopped, undefined with their storage), networks (stopped, undefined) and
# volumes of every active pool (vagrant-libvirt's upload of the box, the domain's
# disk).  Then the storage pools that appeared since vm_start_libvirt (vagrant-libvirt
# defines "default" when there is none), once empty.  Idempotent: a run calls it
# before `vagrant up` (what a killed run left) and on its way out.
vm_remove_libvirt_objects() {
    local re="$1" name pool vol
    for name in $(vm_virsh list --all --name 2>/dev/null | grep -E "$re"); do
        vm_say "virsh: removing domain $name"
        vm_virsh destroy "$name" >/dev/null 2>&1 || true
        vm_virsh undefine "$name" --remove-all-storage >/dev/null 2>&1 ||
            vm_virsh undefine "$name" >/dev/null 2>&1 || true
    done
    for name in $(vm_virsh net-list --all --name 2>/dev/null | grep -E "$re"); do
        vm_say "virsh: removing network $name"
        vm_virsh net-destroy "$name" >/dev/null 2>&1 || true
        vm_virsh net-undefine "$name" >/dev/null 2>&1 || true
    done
    for pool in $(vm_virsh pool-list --name 2>/dev/null); do
        for vol in $(vm_virsh vol-list --pool "$pool" 2>/dev/null |
            awk 'NR > 2 && NF { print $1 }' | grep -E "$re"); do
            vm_say "virsh: removing volume $pool/$vol"
            vm_virsh vol-delete --pool "$pool" "$vol" >/dev/null || true
        done
    done
    for pool in $(vm_virsh pool-list --all --name 2>/dev/null); do
        grep -qxF "$pool" <<<"$VM_POOLS_BEFORE" && continue
        [ -z "$(vm_virsh vol-list --pool "$pool" 2>/dev/null | awk 'NR > 2 && NF')" ] || continue
        vm_say "virsh: removing storage pool $pool (its directory stays)"
        vm_virsh pool-destroy "$pool" >/dev/null 2>&1 || true
        vm_virsh pool-undefine "$pool" >/dev/null 2>&1 || true
    done
}

# Stops what vm_start_libvirt started (libvirtd first), by PID, and waits for it.
vm_stop_libvirt() {
    local i pid others
    [ "${#VM_STARTED_PIDS[@]}" -gt 0 ] || return 0
    # Another run's VM still needs them (a second kernel tested at the same time).
    others="$(vm_virsh list --name 2>/dev/null | grep -v '^$' || true)"
    if [ -n "$others" ]; then
        vm_say "libvirtd left running: domains still up: $(echo $others)"
        return 0
    fi
    for ((i = ${#VM_STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        pid="${VM_STARTED_PIDS[$i]}"
        kill -0 "$pid" 2>/dev/null || continue
        vm_say "stopping pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null))"
        kill "$pid"
        timeout 20 tail --pid="$pid" -f /dev/null || kill -9 "$pid" 2>/dev/null || true
    done
    VM_STARTED_PIDS=()
    vm_remove_libvirt_chains
    # The daemons' runtime state (pid files, a pool's and a network's status); it
    # would otherwise tell the next libvirtd of objects that no longer exist.
    if [ "$VM_RUNDIR_NEW" = 1 ] && ! _vm_running /run/libvirtd.pid; then
        vm_say "removing /run/libvirt (runtime state of the libvirtd it stopped)"
        rm -rf /run/libvirt
    fi
}

# libvirtd adds empty LIBVIRT_* chains (and jumps to them) to iptables and ip6tables
# and leaves them behind when it stops: remove those that are empty.
vm_remove_libvirt_chains() {
    local tool table rule chain
    for tool in iptables ip6tables; do
        command -v "$tool" >/dev/null || continue
        for table in filter nat mangle; do
            "$tool" -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ -j LIBVIRT_[A-Z]+$' |
                while read -r rule; do
                    chain="${rule##* }"
                    [ "$("$tool" -t "$table" -S "$chain" | wc -l)" -eq 1 ] || continue
                    # shellcheck disable=SC2086  # the rule's words are the arguments
                    "$tool" -t "$table" -D ${rule#-A } && vm_say "$tool -t $table: removed $rule"
                done
            for chain in $("$tool" -t "$table" -S 2>/dev/null | sed -n 's/^-N \(LIBVIRT_[A-Z]*\)$/\1/p'); do
                "$tool" -t "$table" -X "$chain" 2>/dev/null || true
            done
        done
    done
}
