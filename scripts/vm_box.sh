#!/usr/bin/env bash
# Builds a vagrant-libvirt box of Debian 12 from Debian's own packages, on one of
# Debian 12's kernels, and adds it to Vagrant as nodeproxy/bookworm-<kernel>.
#
#   scripts/vm_box.sh 6.1|6.12|5.10   (make vm-box KERNEL=6.1|6.12|5.10)
#
# Steps: host packages (vagrant, vagrant-libvirt, libvirt, QEMU, mmdebstrap);
# mmdebstrap a Debian 12 root with the kernel and its headers, openssh-server,
# sudo, rsync and the Debian packages scripts/setup.sh installs (so provisioning
# in the slow, emulated VM only builds the venv); a `vagrant` user with Vagrant's
# insecure key (Vagrant swaps it for a fresh key pair on first `vagrant up`);
# the root as an ext4 image without partitions (`mkfs.ext4 -d`: no loop devices,
# no mounts), converted to qcow2; the kernel and initrd beside it for direct
# kernel boot.  Everything lands in build/vm/<kernel>/; the box is rebuilt only
# when this script, setup.sh's package list or the archive's kernel changed.
# The host's apt sources, CA bundle and /etc/pip.conf are carried into the root,
# as a fresh machine on the same network would have them.
set -euo pipefail

VM_SCRIPT=vm_box
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/vm_host.sh
. "$REPO/scripts/vm_host.sh"

KERNEL="${1:-${KERNEL:-6.1}}"
EXTRA_SOURCES=()                            # apt sources beyond this machine's own
case "$KERNEL" in
6.1) IMAGE_PKG=linux-image-amd64 HEADERS_PKG=linux-headers-amd64 ;;
# Debian 12 ships 6.12 in bookworm-security (linux-image-6.12-amd64, for the
# 12.x point releases' "newer kernel" track).
6.12) IMAGE_PKG=linux-image-6.12-amd64 HEADERS_PKG=linux-headers-6.12-amd64 ;;
# Debian 11's kernel (bullseye-security) under the same Debian 12 root: the kernel is
# what is tried; bullseye's own Python (3.9) is older than nodeproxy's (3.11).  Its
# headers package wants bullseye's gcc-10, hence bullseye main too.
5.10)
    IMAGE_PKG=linux-image-amd64/bullseye-security HEADERS_PKG=linux-headers-amd64/bullseye-security
    EXTRA_SOURCES=("deb http://deb.debian.org/debian bullseye main"
        "deb http://deb.debian.org/debian-security bullseye-security main")
    ;;
*) vm_die "KERNEL must be 6.1, 6.12 or 5.10, not '$KERNEL'" ;;
esac
[ "$(id -u)" -eq 0 ] || vm_die "run as root (mmdebstrap, libvirt)"

BOX_NAME="nodeproxy/bookworm-$KERNEL"
OUT="$REPO/build/vm/$KERNEL"
DISK_SIZE=20G
GUEST_VENV=/nodeproxy/.venv                 # vagrant/Vagrantfile's GUEST_REPO + setup.sh's .venv
WHEELHOUSE=/var/cache/nodeproxy/wheels
START=$SECONDS

vm_install_host_packages
vm_configure_qemu_user

# setup.sh's own package list, read from setup.sh (one source of truth).
mapfile -t SETUP_PACKAGES < <(bash -c '
    eval "$(sed -n "/^APT_PACKAGES=(/,/^)/p" "$1")"
    printf "%s\n" "${APT_PACKAGES[@]}" kubernetes-client' _ "$REPO/scripts/setup.sh")
GUEST_PACKAGES=(systemd-sysv systemd-resolved udev openssh-server sudo rsync ca-certificates
    iproute2 make procps less "$IMAGE_PKG" "$HEADERS_PKG" "${SETUP_PACKAGES[@]}")

# The venv's Python requirements, read from pyproject.toml (runtime, [test] and the
# extras it names of nodeproxy itself), plus what an editable install builds with.
python_requirements() {
    /usr/bin/python3 - "$REPO/pyproject.toml" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project.get("optional-dependencies", {})
seen, todo, out = set(), ["test"], list(project["dependencies"])
while todo:
    extra = todo.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for req in extras[extra]:
        own = re.fullmatch(r"nodeproxy\[([\w,\s-]+)\]", req.strip())
        if own:
            todo += [e.strip() for e in own.group(1).split(",")]
        else:
            out.append(req)
print("\n".join(out + ["setuptools>=61", "wheel"]))
PY
}
mapfile -t PYTHON_REQUIREMENTS < <(python_requirements)

if [ "${#EXTRA_SOURCES[@]}" -gt 0 ]; then
    # Not in this machine's apt lists: mmdebstrap resolves it; the stamp names the suite.
    kernel_version="${IMAGE_PKG#*/} (latest)"
else
    kernel_version="$(apt-cache policy "$IMAGE_PKG" | sed -n 's/ *Candidate: //p')"
    [ -n "$kernel_version" ] && [ "$kernel_version" != "(none)" ] ||
        vm_die "$IMAGE_PKG is not in this machine's apt sources (apt-get update?)"
fi

WORK=""
cleanup() {
    local m
    [ -n "$WORK" ] || return 0
    # mmdebstrap unmounts what it mounted; anything left below WORK (an
    # interrupted run) is unmounted here, deepest first, before the removal.
    for m in $(findmnt -rn -o TARGET | grep -F "$WORK/" | sort -r); do
        umount -l "$m" || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# Stage 1: the root filesystem as OUT/box.img (qcow2) with OUT/vmlinuz and
# OUT/initrd.img.  Its inputs: this function, the package list and the kernel
# version the archive offers now.
build_disk_image() {
    local ROOT="$WORK/root" t0 release f svc insecure_key sources mirrors
    vm_say "mmdebstrap bookworm ($IMAGE_PKG $kernel_version, ${#GUEST_PACKAGES[@]} packages)"
    t0=$SECONDS
    # The host's sources (bookworm, -updates, -security) are the guest's too.  mmdebstrap
    # keeps package scripts from starting services (policy-rc.d) while it installs.
    sources=(/etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list)
    mirrors=()
    for f in "${sources[@]}"; do [ -f "$f" ] && mirrors+=("$f"); done
    mirrors+=("${EXTRA_SOURCES[@]}")
    if ! nice -n 19 mmdebstrap --mode=root --variant=apt --format=directory \
        --include="$(IFS=,; echo "${GUEST_PACKAGES[*]}")" \
        --aptopt='APT::Install-Recommends "false"' \
        bookworm "$ROOT" "${mirrors[@]}" >"$WORK/mmdebstrap.log" 2>&1; then
        tail -n 30 "$WORK/mmdebstrap.log" >&2
        vm_die "mmdebstrap failed"
    fi
    [ -x "$ROOT/usr/bin/ssh-keygen" ] && ls "$ROOT"/boot/vmlinuz-* >/dev/null 2>&1 ||
        vm_die "mmdebstrap did not produce a bootable root"
    vm_say "root built in $((SECONDS - t0))s"

    release="$(basename "$(ls "$ROOT"/boot/vmlinuz-* | sort -V | tail -n 1)")"
    release="${release#vmlinuz-}"
    echo nodeproxy >"$ROOT/etc/hostname"
    printf '127.0.0.1 localhost\n127.0.1.1 nodeproxy\n' >"$ROOT/etc/hosts"
    printf '/dev/vda / ext4 defaults,errors=remount-ro 0 1\n' >"$ROOT/etc/fstab"
    # DHCP on every NIC (libvirt's management network); resolved for DNS.
    mkdir -p "$ROOT/etc/systemd/network"
    printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' >"$ROOT/etc/systemd/network/80-dhcp.network"
    ln -sf /run/systemd/resolve/stub-resolv.conf "$ROOT/etc/resolv.conf"
    chroot "$ROOT" systemctl enable systemd-networkd systemd-resolved ssh >/dev/null 2>&1
    chroot "$ROOT" systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
    # Services setup.sh's packages ship: the tests run their own instances (setup.sh
    # disables only what it installs itself, and here it installs nothing).
    for svc in nginx haproxy prometheus prometheus-node-exporter iperf3; do
        chroot "$ROOT" systemctl disable "$svc" >/dev/null 2>&1 || true
    done
    # Vagrant's user: its insecure public key, password-less sudo.
    chroot "$ROOT" useradd -m -s /bin/bash vagrant
    install -d -m 700 -o 1000 -g 1000 "$ROOT/home/vagrant/.ssh"
    insecure_key="$(dpkg -L vagrant | grep '/keys/vagrant.pub$' | head -n 1)"
    [ -f "$insecure_key" ] || vm_die "Vagrant's insecure public key not found in the vagrant package"
    install -m 600 -o 1000 -g 1000 "$insecure_key" "$ROOT/home/vagrant/.ssh/authorized_keys"
    printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' >"$ROOT/etc/sudoers.d/vagrant"
    chmod 440 "$ROOT/etc/sudoers.d/vagrant"
    printf 'UseDNS no\n' >"$ROOT/etc/ssh/sshd_config.d/vagrant.conf"
    # Every box would share one sshd host key: make a fresh one at first boot.
    rm -f "$ROOT"/etc/ssh/ssh_host_*
    mkdir -p "$ROOT/etc/systemd/system/ssh.service.d"
    printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
        >"$ROOT/etc/systemd/system/ssh.service.d/host-keys.conf"
    # The Python side, baked in: pip under emulation takes ~12 minutes and the VM
    # reaches no package index.  Wheels of every requirement are built here from
    # this machine's own pip configuration (its indexes), the venv setup.sh would
    # make is made in the root (chroot: native speed) from those wheels alone, and
    # the guest's pip is pointed at the wheelhouse only, so provisioning's
    # `pip install -e .[test]` finds everything installed and builds nodeproxy
    # alone, offline.
    vm_say "wheelhouse: pip wheel of ${#PYTHON_REQUIREMENTS[@]} requirements, venv $GUEST_VENV"
    t0=$SECONDS
    mkdir -p "$ROOT$WHEELHOUSE"
    printf '%s\n' "${PYTHON_REQUIREMENTS[@]}" >"$ROOT$WHEELHOUSE/requirements.txt"
    if ! nice -n 19 /usr/bin/python3 -m pip wheel -q --disable-pip-version-check \
        --wheel-dir "$ROOT$WHEELHOUSE" -r "$ROOT$WHEELHOUSE/requirements.txt" \
        >"$WORK/pip-wheel.log" 2>&1; then
        grep -v "is ignored: it is neither" "$WORK/pip-wheel.log" | tail -n 20 >&2
        vm_die "pip wheel failed (this machine's pip indexes lack a requirement?)"
    fi
    printf '[global]\nno-index = true\nfind-links = %s\ndisable-pip-version-check = true\n' \
        "$WHEELHOUSE" >"$ROOT/etc/pip.conf"
    # A clean environment: this machine's PIP_* variables name its own indexes.
    chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        /usr/bin/python3 -m venv --system-site-packages "$GUEST_VENV"
    chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        "$GUEST_VENV/bin/pip" install -q -r "$WHEELHOUSE/requirements.txt" ||
        vm_die "pip install from the wheelhouse failed in the root"
    vm_say "wheelhouse and venv in $((SECONDS - t0))s ($(du -sh "$ROOT$WHEELHOUSE" | cut -f1) of wheels)"
    rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/*_Packages

    vm_say "ext4 image ($DISK_SIZE sparse) from the root, then qcow2"
    t0=$SECONDS
    cp "$ROOT/boot/vmlinuz-$release" "$WORK/vmlinuz"
    cp "$ROOT/boot/initrd.img-$release" "$WORK/initrd.img"
    nice -n 19 mkfs.ext4 -q -L root -d "$ROOT" "$WORK/root.ext4" "$DISK_SIZE"
    nice -n 19 qemu-img convert -O qcow2 "$WORK/root.ext4" "$WORK/box.img"
    rm -f "$WORK/root.ext4"
    vm_say "disk image in $((SECONDS - t0))s ($(du -h "$WORK/box.img" | cut -f1) qcow2)"
    mv "$WORK/box.img" "$WORK/vmlinuz" "$WORK/initrd.img" "$OUT/"
    printf '%s\n' "$release" >"$OUT/kernel-release"
}

# Stage 2: the box around it.  Its own Vagrantfile boots the kernel directly under
# QEMU's software emulation (TCG: /dev/kvm may be missing or unable to run this
# kernel) with the CPU model "max" (libvirt's cpu mode "maximum"); a Vagrantfile
# that uses the box can override any of it.
write_box_files() {
    printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "${DISK_SIZE%G}" \
        >"$OUT/metadata.json"
    cat >"$OUT/Vagrantfile" <<VAGRANT
# $BOX_NAME: Debian 12, kernel $(cat "$OUT/kernel-release"), built by scripts/vm_box.sh.
Vagrant.configure("2") do |config|
  config.vm.boot_timeout = 900
  config.vm.provider :libvirt do |lv|
    lv.driver = "qemu"
    lv.cpu_mode = "maximum"
    lv.kernel = File.expand_path("vmlinuz", __dir__)
    lv.initrd = File.expand_path("initrd.img", __dir__)
    lv.cmd_line = "root=/dev/vda rw console=ttyS0"
    lv.disk_bus = "virtio"
    lv.graphics_type = "none"
    lv.video_type = "none"
  end
end
VAGRANT
}

mkdir -p "$OUT"
image_stamp="$( { declare -f build_disk_image; printf '%s\n' "${GUEST_PACKAGES[@]}" \
    "${PYTHON_REQUIREMENTS[@]}" "${EXTRA_SOURCES[@]}" \
    "$kernel_version" "$DISK_SIZE"; } | sha256sum | cut -d' ' -f1)"
if [ -f "$OUT/box.img" ] && [ "$(cat "$OUT/image.stamp" 2>/dev/null)" = "$image_stamp" ]; then
    vm_say "disk image up to date ($IMAGE_PKG $kernel_version)"
else
    rm -f "$OUT/image.stamp" "$OUT/box.stamp"
    WORK="$(mktemp -d "$REPO/build/vm-box.XXXXXX")"
    build_disk_image
    printf '%s\n' "$image_stamp" >"$OUT/image.stamp"
fi

write_box_files
box_stamp="$( { echo "$image_stamp"; cat "$OUT/metadata.json" "$OUT/Vagrantfile"; } |
    sha256sum | cut -d' ' -f1)"
if [ "$(cat "$OUT/box.stamp" 2>/dev/null)" = "$box_stamp" ] &&
    vagrant box list 2>/dev/null | grep -q "^$BOX_NAME "; then
    vm_say "box $BOX_NAME is up to date (kernel $(cat "$OUT/kernel-release")); nothing to do"
    exit 0
fi
vm_say "packing and adding box $BOX_NAME"
WORK="${WORK:-$(mktemp -d "$REPO/build/vm-box.XXXXXX")}"
tar -C "$OUT" -cf "$WORK/box.box" metadata.json Vagrantfile box.img vmlinuz initrd.img
if ! vagrant box add --force --name "$BOX_NAME" "$WORK/box.box" >"$WORK/box-add.log" 2>&1; then
    tr '\r' '\n' <"$WORK/box-add.log" | grep -v 'Progress:' | tail -n 20 >&2
    vm_die "vagrant box add $BOX_NAME failed"
fi
printf '%s\n' "$box_stamp" >"$OUT/box.stamp"
vm_say "box $BOX_NAME (kernel $(cat "$OUT/kernel-release")) ready in $((SECONDS - START))s"
