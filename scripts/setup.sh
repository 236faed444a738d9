#!/usr/bin/env bash
# One-command install of everything nodeproxy, its tests and its demo need, on
# Debian 12, as root.  Idempotent: it only acts on what is missing, says what it
# does, and a second run changes nothing and takes about a second.
#
#   1. apt packages (apt-get update + install only if one is missing); services
#      those packages would start (nginx, haproxy, prometheus, ...) are kept
#      from starting and disabled, so nothing binds host ports behind our back
#   2. kernel headers for bcc: /lib/modules/$(uname -r)/build, falling back to
#      Debian's linux-headers-amd64 when this kernel ships none (existing real
#      headers are never touched)
#   3. .venv made with /usr/bin/python3 --system-site-packages (sees Debian's bcc)
#   4. pip install -e '.[test]' when pyproject.toml changed since the last install
#      (it compiles the L7 request path with mypyc: setup.py, nodeproxy/native.py)
#   5. bpffs mounted at /sys/fs/bpf
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
STAMP="$VENV/.nodeproxy-install-stamp"
PYTHON=/usr/bin/python3
BPFFS=/sys/fs/bpf

APT_PACKAGES=(
    python3-bpfcc bpfcc-tools bpftool linux-headers-amd64 containernetworking-plugins
    iproute2 python3-venv python3-pip nginx-light haproxy iperf3 sockperf wrk curl socat
    tcpdump prometheus nghttp2-client
    iptables  # capture.mode: iptables (iptables-nft, ip6tables)
    nftables  # `nft`: iptables mode removes an emptied nf_tables table; its tests list rules
    ruby  # tests/unit/test_vagrant.py: `ruby -c vagrant/Vagrantfile`
    make  # `make demo`, `make test` (a minimal Debian 12 has no make)
    procps  # `sysctl`: the testbed sets each simulated node's forwarding (not in minbase)
    gcc python3-dev  # pip install compiles the L7 path with mypyc (setup.py; optional)
)
# tests/unit/test_manifests.py runs `kubectl kustomize`.  Debian's package is
# kubernetes-client; a machine that already has a kubectl (another vendor's package,
# which owns /usr/bin/kubectl too) keeps it.
command -v kubectl >/dev/null 2>&1 || APT_PACKAGES+=(kubernetes-client)
# Services the packages above ship; tests and benchmarks run their own instances.
SERVICES=(nginx haproxy prometheus prometheus-node-exporter iperf3)

START=$SECONDS
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: it installs packages, links kernel headers, mounts bpffs"
command -v apt-get >/dev/null && command -v dpkg-query >/dev/null ||
    die "apt-get/dpkg-query not found: this script is for Debian 12"

# ------------------------------------------------------------------ 1. packages
. "$REPO/scripts/lib/apt.sh"

service_exists() {
    [ -e "/etc/init.d/$1" ] || [ -e "/lib/systemd/system/$1.service" ] ||
        [ -e "/usr/lib/systemd/system/$1.service" ]
}

disable_service() {
    local svc="$1"
    if [ -d /run/systemd/system ]; then
        say "service $svc: systemctl disable --now"
        systemctl disable --now "$svc"
    else
        if "/etc/init.d/$svc" status >/dev/null 2>&1; then
            say "service $svc: stopping"
            "/etc/init.d/$svc" stop
        fi
        # A package that ships no runlevel links (iperf3 on a minimal root) makes
        # update-rc.d exit 1 with "no runlevel symlinks to modify": nothing to disable.
        if ls /etc/rc?.d/S??"$svc" >/dev/null 2>&1; then
            say "service $svc: disabling at boot (update-rc.d $svc disable)"
            update-rc.d "$svc" disable >/dev/null
        else
            say "service $svc: not started at boot (no runlevel links)"
        fi
    fi
}

POLICY_RC=/usr/sbin/policy-rc.d
CREATED_POLICY=0
remove_policy() {
    if [ "$CREATED_POLICY" = 1 ]; then
        rm -f "$POLICY_RC"
        CREATED_POLICY=0
    fi
}
trap remove_policy EXIT

install_packages() {
    local missing svc
    mapfile -t missing < <(apt_missing "${APT_PACKAGES[@]}")
    if [ "${#missing[@]}" -eq 0 ]; then
        say "apt packages: all ${#APT_PACKAGES[@]} installed"
        return
    fi
    local new_services=()
    for svc in "${SERVICES[@]}"; do
        service_exists "$svc" || new_services+=("$svc")
    done
    say "apt packages missing: ${missing[*]}"
    # policy-rc.d exit 101 = "do not start services" for maintainer scripts
    # (invoke-rc.d and deb-systemd-invoke both obey it).
    if [ ! -e "$POLICY_RC" ]; then
        say "installing a temporary $POLICY_RC so package scripts start no services"
        printf '#!/bin/sh\n# nodeproxy setup.sh: start no services during install\nexit 101\n' \
            >"$POLICY_RC"
        chmod 755 "$POLICY_RC"
        CREATED_POLICY=1
    fi
    say "apt-get update; apt-get install ${missing[*]}"
    local t0=$SECONDS
    apt_install "${missing[@]}"
    say "apt packages: installed in $((SECONDS - t0))s"
    remove_policy
    # Disable only the services this run brought in; an admin's own are left alone.
    for svc in "${new_services[@]}"; do
        if service_exists "$svc"; then
            disable_service "$svc"
        fi
    done
}

# ------------------------------------------------------------------ 2. kernel headers
link_headers() {
    local release build source target hdr common
    release="$(uname -r)"
    build="/lib/modules/$release/build"
    source="/lib/modules/$release/source"
    if [ -e "$build" ]; then
        target="$(readlink -f "$build")"
        # Our own fallback link: make sure its source link exists too.
        case "$target" in
        /usr/src/linux-headers-*-amd64)
            common="${target%-amd64}-common"
            if [ ! -e "$source" ] && [ -d "$common" ]; then
                [ -L "$source" ] && rm -f "$source"
                say "kernel headers: linking $source -> $common"
                ln -s "$common" "$source"
            fi
            ;;
        esac
        say "kernel headers: $build -> $target"
        return
    fi
    if [ -L "$build" ]; then
        say "kernel headers: removing dangling link $build -> $(readlink "$build")"
        rm -f "$build"
    fi
    # A distribution kernel: its own headers package is the right answer.
    if apt-cache policy "linux-headers-$release" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        say "kernel headers: apt-get install linux-headers-$release"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            "linux-headers-$release"
        if [ -e "$build" ]; then
            say "kernel headers: $build -> $(readlink -f "$build")"
            return
        fi
    fi
    # This kernel ships no headers: bcc's programs use only UAPI context structs,
    # which Debian's generic headers provide (see DESIGN.md).
    hdr="$(find /usr/src -maxdepth 1 -type d -name 'linux-headers-*-amd64' | sort -V | tail -n 1)"
    [ -n "$hdr" ] || die "no /usr/src/linux-headers-*-amd64 (apt-get install linux-headers-amd64)"
    common="${hdr%-amd64}-common"
    [ -d "$common" ] || die "$hdr has no matching $common"
    mkdir -p "/lib/modules/$release"
    say "kernel headers: $release ships none; linking $build -> $hdr"
    ln -s "$hdr" "$build"
    if [ ! -e "$source" ]; then
        [ -L "$source" ] && rm -f "$source"
        say "kernel headers: linking $source -> $common"
        ln -s "$common" "$source"
    fi
}

# ------------------------------------------------------------------ 3. venv
make_venv() {
    if [ -x "$VENV/bin/python" ] &&
        grep -qiE '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg" 2>/dev/null &&
        "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        say "venv: $VENV exists"
        return
    fi
    if [ -e "$VENV" ]; then
        say "venv: $VENV is broken or lacks --system-site-packages (bcc would be invisible); recreating"
        rm -rf "$VENV"
    fi
    say "venv: $PYTHON -m venv --system-site-packages $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
}

# ------------------------------------------------------------------ 4. python packages
install_python_packages() {
    local want have
    want="$( { sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1; echo "$REPO"; } | sha256sum |
        cut -d' ' -f1)"
    have="$(cat "$STAMP" 2>/dev/null || true)"
    if [ "$want" = "$have" ] &&
        (cd / && "$VENV/bin/python" -c 'import nodeproxy, pytest, pytest_timeout' 2>/dev/null) &&
        [ -x "$VENV/bin/ruff" ] && [ -x "$VENV/bin/nodeproxy" ]; then
        say "python packages: up to date (pyproject.toml unchanged)"
        return
    fi
    say "python packages: pip install -e '.[test]'"
    local t0=$SECONDS
    "$VENV/bin/pip" install --disable-pip-version-check -q -e "${REPO}[test]"
    say "python packages: installed in $((SECONDS - t0))s"
    printf '%s\n' "$want" >"$STAMP"
}

check_bcc_visible() {
    (cd / && "$VENV/bin/python" -c 'import bcc; bcc.BPF' 2>/dev/null) ||
        die "the venv cannot import bcc (python3-bpfcc): is $VENV a --system-site-packages venv of $PYTHON?"
}

# ------------------------------------------------------------------ 5. bpffs
mount_bpffs() {
    if awk -v p="$BPFFS" '$2 == p && $3 == "bpf" { found = 1 } END { exit !found }' /proc/mounts
    then
        say "bpffs: mounted at $BPFFS"
        return
    fi
    say "bpffs: mount -t bpf bpf $BPFFS"
    mkdir -p "$BPFFS"
    mount -t bpf bpf "$BPFFS"
}

install_packages
link_headers
make_venv
install_python_packages
check_bcc_visible
mount_bpffs
say "done in $((SECONDS - START))s"
