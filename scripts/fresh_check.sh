#!/usr/bin/env bash
# fresh_check.sh: prove that scripts/setup.sh sets up a fresh Debian 12 machine from nothing.
#
# `make fresh-check` (and .ci/run) call this, as root, on a Debian 12 host.  It
#   1. installs what it needs on the host itself (mmdebstrap, git), idempotently;
#   2. builds a minimal Debian 12 root with mmdebstrap --variant=minbase from
#      Debian's archive through the host's apt sources: essential + required
#      packages + apt, what a minimal install or Debian's container image has.
#      Nothing of the project's is included: setup.sh must install it all;
#   3. gives the root what a fresh machine on this network would have: the host's
#      apt sources and Acquire:: settings, CA bundle, resolv.conf, a stock
#      /etc/hosts, and pip's configuration (/etc/pip.conf, /etc/xdg/pip, root's
#      ~/.config/pip, PIP_* variables) with the local directories it names
#      (file:// indexes, find-links) bind-mounted read-only;
#   4. copies the repository in (tracked and untracked files that git does not
#      ignore, so no .venv, no caches) to /root/nodeproxy;
#   5. mounts /proc, /sys, cgroup2 at /sys/fs/cgroup and /dev in the root (a
#      tmpfs, so `ip netns exec` finds / a mount point), chroots on the host
#      kernel and runs, failing at the first step that fails, with its name:
#        bash scripts/setup.sh   (must also mount bpffs at /sys/fs/bpf itself)
#        bash scripts/setup.sh   (again: must find everything in place)
#        nodeproxy check
#        make demo
#   6. removes everything it made, also on failure and on Ctrl-C.  Steps 2-5 run
#      in mount, PID and cgroup namespaces of their own (the cgroup2 they see is a
#      cgroup made for the run): the root's tmpfs, every mount and every process
#      die with them, however the run ends; the run's cgroup and its (empty)
#      directory under /var/tmp are removed after.
#
# Only downloads are kept between runs: apt's .deb files (FRESH_CHECK_APT_CACHE,
# default /var/cache/nodeproxy-fresh-check/apt) and pip's cache (FRESH_CHECK_PIP_CACHE,
# default /var/cache/nodeproxy-fresh-check/pip); set one empty to keep nothing.  apt
# checks every cached file against the archive's index before using it, pip still
# resolves every requirement against the indexes, and setup.sh still installs every
# package into the new root.  Run time is printed per step.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUITE=bookworm
APT_CACHE="${FRESH_CHECK_APT_CACHE-/var/cache/nodeproxy-fresh-check/apt}"
PIP_CACHE="${FRESH_CHECK_PIP_CACHE-/var/cache/nodeproxy-fresh-check/pip}"
INNER_REPO=/root/nodeproxy   # where the repository lies inside the root

say() { printf 'fresh-check: %s\n' "$*"; }
die() { printf 'fresh-check: FAILED: %s\n' "$*" >&2; exit 1; }

# ============================================================== inside the namespaces
# `fresh_check.sh --inside WORK` runs as PID 1 of a new PID namespace, in private
# mount and cgroup namespaces, so every mount below (the root itself is a tmpfs)
# and every process started here goes away when it exits, however it exits.
inside() {
    local root="$1/root" bind src dst t0
    mkdir -p "$root"
    # A tmpfs is a mount point, as the chroot's / must be for `ip netns exec`.
    mount -t tmpfs -o mode=755,size=8g fresh-check-root "$root"
    t0=$SECONDS
    build_root "$root"
    say "root built in $((SECONDS - t0))s ($(du -sh --one-file-system "$root" | cut -f1))"
    furnish_root "$root"
    copy_repository "$root"

    mount -t proc proc "$root/proc"
    mount -t sysfs sysfs "$root/sys"
    mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
    mount --rbind /dev "$root/dev"
    mount --make-rslave "$root/dev"
    for bind in "${BINDS[@]}"; do
        src="${bind%%=*}" dst="$root${bind#*=}"
        mkdir -p "$dst"
        mount --bind "$src" "$dst"
        case "$bind" in
        *=/var/cache/apt/archives | *=/root/.cache/pip) ;;   # the caches are written to
        *) mount -o remount,bind,ro "$dst" ;;
        esac
    done

    local -a env=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
        HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}" DEBIAN_FRONTEND=noninteractive)
    local var
    for var in $(compgen -e); do
        case "$var" in PIP_*) env+=("$var=${!var}") ;; esac
    done
    in_root() { chroot "$root" /usr/bin/env -i "${env[@]}" "$@"; }

    local step out
    step() {   # step NAME COMMAND...: run it in the root, from the repository
        step="$1"
        shift
        say "---- $step"
        t0=$SECONDS
        if ! in_root /bin/bash -c 'cd "$0" && exec "$@"' "$INNER_REPO" "$@"; then
            die "step '$step' exited non-zero (its output is above)"
        fi
        say "---- $step: ok in $((SECONDS - t0))s"
    }

    step "setup.sh on the fresh root" bash scripts/setup.sh
    # Read in the root: its /proc/mounts shows paths as the chroot sees them.
    in_root awk '$2 == "/sys/fs/bpf" && $3 == "bpf" { found = 1 } END { exit !found }' \
        /proc/mounts || die "setup.sh left no bpffs at /sys/fs/bpf"
    say "---- setup.sh a second time (must find everything in place)"
    t0=$SECONDS
    out="$(in_root /bin/bash -c 'cd "$0" && bash scripts/setup.sh' "$INNER_REPO" 2>&1)" ||
        { printf '%s\n' "$out"; die "the second setup.sh exited non-zero"; }
    printf '%s\n' "$out"
    grep -q '^setup: apt packages: all [0-9]* installed$' <<<"$out" ||
        die "the second setup.sh still installed packages"
    grep -q '^setup: python packages: up to date' <<<"$out" ||
        die "the second setup.sh reinstalled the python packages"
    say "---- setup.sh a second time: ok in $((SECONDS - t0))s"
    step "nodeproxy check" .venv/bin/nodeproxy check
    step "make demo" make demo
    # Keep the .deb cache to what the archive still offers.
    [ -z "$APT_CACHE" ] || in_root apt-get autoclean -q >/dev/null || true
}

# ============================================================== on the host
START=$SECONDS

# ---------------------------------------------------------------- host tools
host_tools() {
    local -a missing=()
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v git >/dev/null || missing+=(git)
    command -v unshare >/dev/null && command -v chroot >/dev/null ||
        die "unshare/chroot not found (util-linux, coreutils)"
    if [ "${#missing[@]}" -gt 0 ]; then
        say "host: apt-get install ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
}

# ---------------------------------------------------------------- cgroup
# The steps run in a cgroup of their own and a cgroup namespace rooted there, so the
# cgroup2 they mount at /sys/fs/cgroup shows only their own subtree.  The cgroup
# hierarchy is the host's: without this, the testbed's sweep of leftovers (npt-*
# cgroups whose run directory it cannot see) would take the host's test clusters
# for leftovers and kill them, and a cluster on the host would kill the root's.
CGROUP=""
make_cgroup() {
    local mnt
    mnt="$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)"
    [ -n "$mnt" ] || die "no cgroup2 file system is mounted on the host (see /proc/mounts)"
    CGROUP="$mnt/nodeproxy-fresh-check.${WORK##*.}"
    mkdir "$CGROUP"
}

remove_cgroup() {   # remove_cgroup DIR: kill what is left in it, then remove it
    local cg="$1"
    [ -n "$cg" ] && [ -d "$cg" ] || return 0
    for _ in $(seq 50); do
        grep -q '^populated 0$' "$cg/cgroup.events" && break
        echo 1 >"$cg/cgroup.kill" 2>/dev/null || true
        sleep 0.2
    done
    find "$cg" -depth -type d -delete 2>/dev/null ||
        printf 'fresh-check: could not remove the cgroup %s\n' "$cg" >&2
}

remove_work() {   # remove_work DIR: the root's directory, never through a mount
    local dir="$1"
    [ -n "$dir" ] && [ -d "$dir" ] || return 0
    # Mounts are made in namespaces of their own; were one visible here, deleting
    # would reach into it: refuse instead.
    if awk -v w="$dir/" 'index($2 "/", w) == 1 { found = 1 } END { exit !found }' \
        /proc/self/mounts; then
        printf 'fresh-check: mounts remain under %s; not deleting it\n' "$dir" >&2
        return 1
    fi
    rm -rf --one-file-system "$dir"
}

# What a run killed outright (SIGKILL, power loss) left: its directory and cgroup.  A
# run holds a lock on its directory while it lives; one that can be locked is stale.
sweep_stale_runs() {
    local dir mnt
    mnt="$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)"
    for dir in /var/tmp/nodeproxy-fresh-check.*; do
        [ -d "$dir" ] && [ -e "$dir/lock" ] || continue
        flock -n "$dir/lock" true || continue
        say "removing what a killed run left: $dir"
        [ -z "$mnt" ] || remove_cgroup "$mnt/nodeproxy-fresh-check.${dir##*.}"
        remove_work "$dir" || true
    done
}

# ---------------------------------------------------------------- clean-up
WORK=""
CHILD=""
cleanup() {
    local rc=$?
    trap - EXIT
    trap '' INT TERM HUP   # finish cleaning up
    if [ -n "$CHILD" ] && kill -0 "$CHILD" 2>/dev/null; then
        # Ask every process of the run to stop (Ctrl-C reached them already: same
        # process group) and give the demo time to take its nodes down before the
        # namespace is killed.
        if [ -n "$CGROUP" ] && [ -d "$CGROUP" ]; then
            # shellcheck disable=SC2038  # the files hold PIDs
            find "$CGROUP" -name cgroup.procs -exec cat {} + 2>/dev/null |
                xargs -r kill -TERM 2>/dev/null || true
        fi
        for _ in $(seq 30); do
            kill -0 "$CHILD" 2>/dev/null || break
            sleep 1
        done
        kill -KILL "$CHILD" 2>/dev/null || true
        wait "$CHILD" 2>/dev/null || true
    fi
    remove_cgroup "$CGROUP"
    remove_work "$WORK" || rc=1
    if [ "$rc" -eq 0 ]; then
        say "passed in $((SECONDS - START))s"
    else
        printf 'fresh-check: FAILED (exit %s) after %ss\n' "$rc" "$((SECONDS - START))" >&2
    fi
    exit "$rc"
}

# ---------------------------------------------------------------- build the root
apt_sources() {   # the host's active source files
    local f
    [ -s /etc/apt/sources.list ] && grep -q '^[[:space:]]*deb' /etc/apt/sources.list &&
        printf '%s\n' /etc/apt/sources.list
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && printf '%s\n' "$f"
    done
}

build_root() {
    local root="$1" f
    local -a args=(--variant=minbase --mode=root --format=directory)
    # apt settings the host needs to reach its sources (proxies, TLS, snapshot validity).
    for f in /etc/apt/apt.conf.d/*; do
        [ -f "$f" ] && grep -qE \
            '^[[:space:]]*Acquire::(.*::)?(Proxy|Check-Valid-Until|Check-Date|CaInfo|Verify-Peer)' \
            "$f" && args+=(--aptopt="$f")
    done
    if [ -n "$APT_CACHE" ]; then
        # The cache is mounted over the root's archive directory while mmdebstrap
        # installs, and unmounted before its clean-up empties that directory.
        mkdir -p "$APT_CACHE/partial"
        args+=(--skip=download/empty
            --setup-hook="mkdir -p \"\$1\"/var/cache/apt/archives"
            --setup-hook="mount --bind '$APT_CACHE' \"\$1\"/var/cache/apt/archives"
            --customize-hook="umount \"\$1\"/var/cache/apt/archives")
    fi
    mapfile -t sources < <(apt_sources)
    [ "${#sources[@]}" -gt 0 ] || die "no apt sources on the host (/etc/apt/sources.list*)"
    say "mmdebstrap ${args[*]} $SUITE $root ${sources[*]}"
    mmdebstrap --quiet "${args[@]}" "$SUITE" "$root" "${sources[@]}" ||
        die "mmdebstrap could not build the root"
    # Keyrings the sources name that the root lacks (a third-party repository's).
    local key
    for key in $(grep -hoE '(Signed-By:|signed-by=)[[:space:]]*/[^] ]+' "${sources[@]}" |
        sed -E 's/^(Signed-By:|signed-by=)[[:space:]]*//' | sort -u); do
        [ -e "$root$key" ] || [ ! -f "$key" ] || install -D -m 644 "$key" "$root$key"
    done
}

# Absolute local paths named in pip's configuration (cert, constraint, find-links,
# file:// index URLs), one a line.
pip_paths() {
    local -a files=(/etc/pip.conf /etc/xdg/pip/pip.conf /root/.config/pip/pip.conf
        /root/.pip/pip.conf)
    local var
    {
        cat "${files[@]}" 2>/dev/null | grep -v '^[[:space:]]*[#;]' | sed -n 's/^[^=]*=//p'
        for var in $(compgen -e); do
            case "$var" in PIP_*) printf '%s\n' "${!var}" ;; esac
        done
    } | tr ' \t' '\n\n' | sed -E 's#^file://##' | grep '^/' | sort -u
}

# The certificates of the host's CA bundle that Debian's ca-certificates does not
# ship (a local CA the network's package mirrors are signed with), as PEM.
local_ca_certs() {
    local -a stock
    mapfile -t stock < <(find /usr/share/ca-certificates -name '*.crt' 2>/dev/null)
    awk '
        FNR == 1 { stock = FILENAME != "/etc/ssl/certs/ca-certificates.crt" }
        /-----BEGIN CERTIFICATE-----/ { body = ""; pem = $0 "\n"; inside = 1; next }
        inside { pem = pem $0 "\n" }
        /-----END CERTIFICATE-----/ {
            inside = 0
            if (stock) seen[body] = 1; else if (!(body in seen)) printf "%s", pem
            next
        }
        inside { body = body $0 }
    ' "${stock[@]}" /etc/ssl/certs/ca-certificates.crt
}

BINDS=()
furnish_root() {
    local root="$1" f p
    # The bundle as the host has it, for what runs before ca-certificates is
    # installed; its local certificates also where update-ca-certificates keeps
    # them when setup.sh's packages pull ca-certificates in and rebuild the bundle.
    install -D -m 644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$root/usr/local/share/ca-certificates"
    local_ca_certs | awk -v dir="$root/usr/local/share/ca-certificates" '
        /-----BEGIN CERTIFICATE-----/ { n++ }
        { print > (dir "/host-local-ca-" n ".crt") }'
    cp -L /etc/resolv.conf "$root/etc/resolv.conf"
    [ -e "$root/etc/hosts" ] || printf '%s\n' '127.0.0.1	localhost' \
        '::1		localhost ip6-localhost ip6-loopback' \
        'ff02::1		ip6-allnodes' 'ff02::2		ip6-allrouters' >"$root/etc/hosts"
    for f in /etc/pip.conf /root/.config/pip/pip.conf /root/.pip/pip.conf; do
        [ -f "$f" ] && install -D -m 644 "$f" "$root$f"
    done
    [ -d /etc/xdg/pip ] && mkdir -p "$root/etc/xdg" && cp -a /etc/xdg/pip "$root/etc/xdg/"
    # dpkg without an fsync per file, as in Debian's container images: the root is
    # thrown away.
    printf 'force-unsafe-io\n' >"$root/etc/dpkg/dpkg.cfg.d/fresh-check-unsafe-io"
    while read -r p; do
        # A local "simple" index links to ../../files: carry the directory above it.
        [[ "$p" == */simple ]] && p="${p%/simple}"
        [ -e "$root$p" ] && continue
        if [ -d "$p" ]; then
            BINDS+=("$p=$p")
        elif [ -f "$p" ]; then
            install -D -m 644 "$p" "$root$p"
        fi
    done < <(pip_paths | sed 's#/$##' | sort -u)
    if [ -n "$APT_CACHE" ]; then
        BINDS+=("$APT_CACHE=/var/cache/apt/archives")
    fi
    if [ -n "$PIP_CACHE" ]; then
        mkdir -p "$PIP_CACHE"
        BINDS+=("$PIP_CACHE=/root/.cache/pip")
    fi
}

copy_repository() {
    local root="$1"
    mkdir -p "$root$INNER_REPO"
    if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # What is in the work tree, less what git ignores (.venv, caches, results).
        (cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
            tar --null -T - -cf -) | tar -xf - -C "$root$INNER_REPO"
    else
        tar -C "$REPO" --exclude=.venv --exclude=__pycache__ --exclude=.pytest_cache \
            --exclude=.ruff_cache --exclude='*.egg-info' -cf - . | tar -xf - -C "$root$INNER_REPO"
    fi
}

main() {
    if [ "${1:-}" = "--inside" ]; then
        shift
        inside "$@"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "run as root: it builds a root file system, mounts and chroots"
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP
    host_tools
    sweep_stale_runs
    WORK="$(mktemp -d /var/tmp/nodeproxy-fresh-check.XXXXXX)"
    exec 9>"$WORK/lock"
    flock -n 9 || die "cannot lock $WORK/lock"
    make_cgroup
    say "building a root on a tmpfs at $WORK/root and running the steps in it (chroot;" \
        "mount, PID and cgroup namespaces of their own)"
    # Into the run's cgroup, then unshare (killed if this script is: --pdeathsig),
    # whose child, PID 1 of the namespace, is killed with it (--kill-child).
    # shellcheck disable=SC2016  # $$ and $1 are the inner shell's
    bash -c 'echo $$ >"$1/cgroup.procs" && shift && exec "$@"' fresh-check "$CGROUP" \
        setpriv --pdeathsig KILL \
        unshare --cgroup --mount --propagation private --pid --fork --kill-child \
        --mount-proc bash "$REPO/scripts/fresh_check.sh" --inside "$WORK" &
    CHILD=$!
    wait "$CHILD" || die "in the fresh root (exit $?)"
    CHILD=""
}

# One call at the end: bash has read the whole file before anything runs.
main "$@"
