#!/usr/bin/env bash
# make image: build the DaemonSet's image (Containerfile) from Debian's packages
# only, into an OCI archive.  No container registry is needed:
#
#   1. Debian packages mmdebstrap, podman, buildah and runc are installed if
#      missing (apt-get; nothing when all are there);
#   2. build/debian12-rootfs.tar: a minimal Debian 12 root (mmdebstrap
#      --variant=minbase) from Debian's archive, made once;
#   3. it is imported as localhost/debian:12-mmdebstrap into a container store
#      of this build's own (build/containers: the machine's podman store is not
#      touched);
#   4. podman build -f Containerfile --build-arg BASE_IMAGE=that image;
#   5. podman save --format oci-archive -> build/nodeproxy-image.tar (rewritten
#      only when the image changed).
#
# Load the result with `podman load -i build/nodeproxy-image.tar`, or
# `ctr -n k8s.io images import build/nodeproxy-image.tar` on a containerd node.
# Idempotent: a second run reuses the root, the import and podman's layer cache.
#
# Environment: IMAGE (default nodeproxy:<version>), ARCHIVE, MIRROR (default
# http://deb.debian.org/debian), SECURITY_MIRROR, PIP_CERT (a CA bundle pip must
# trust to reach PyPI, passed to the build as a secret).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$REPO/build"
VERSION="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml")"
IMAGE="${IMAGE:-nodeproxy:$VERSION}"
ARCHIVE="${ARCHIVE:-$BUILD/nodeproxy-image.tar}"
ROOTFS="$BUILD/debian12-rootfs.tar"
BASE=localhost/debian:12-mmdebstrap
STORE="$BUILD/containers"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
PACKAGES=(mmdebstrap podman buildah runc)

START=$SECONDS
say() { printf 'image: %s\n' "$*"; }
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (mmdebstrap and podman's own store)"

# ------------------------------------------------------------------ 1. packages
. "$REPO/scripts/lib/apt.sh"
mapfile -t missing < <(apt_missing "${PACKAGES[@]}")
if [ "${#missing[@]}" -gt 0 ]; then
    say "apt-get install ${missing[*]}"
    apt_install "${missing[@]}"
else
    say "packages: ${PACKAGES[*]} installed"
fi

# ------------------------------------------------------------------ podman, as this machine allows
# The container store is this build's own.
PODMAN=(podman --root "$STORE/root" --runroot "$STORE/run" --storage-driver overlay)
# Podman's overlay driver bind-mounts its layer directory onto itself; a build that fails
# can leave that mount behind, and then nothing can remove the checkout.  Let it go on
# any exit (the next podman call mounts it again).
release_store() {
    if mountpoint -q "$STORE/root/overlay"; then
        umount --recursive "$STORE/root/overlay" || say "could not unmount $STORE/root/overlay"
    fi
}
trap release_store EXIT
# crun refuses a hybrid cgroup layout whose v2 hierarchy has controllers
# ("cgroups in hybrid mode not supported"); runc runs there, and everywhere else.
RUNTIME=(--runtime runc)
# Podman asks for nofile 1048576 and nproc 4194304 by default; without
# CAP_SYS_RESOURCE (some sandboxes) that fails with "setrlimit ... Operation not
# permitted".  Ask for what this process already has.
nofile="$(ulimit -Hn)"
nproc="$(ulimit -Hu)"
[ "$nofile" = unlimited ] && nofile=1048576
pid_max="$(cat /proc/sys/kernel/pid_max)"
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; } && nproc="$pid_max"
ULIMITS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc")

# ------------------------------------------------------------------ 2. the Debian 12 root
mkdir -p "$BUILD"
if [ -s "$ROOTFS" ]; then
    say "base root: $ROOTFS exists"
else
    say "base root: mmdebstrap --variant=minbase bookworm -> $ROOTFS"
    nice -n 10 mmdebstrap --quiet --mode=root --variant=minbase --format=tar bookworm \
        "$ROOTFS.tmp" \
        "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" \
        "deb $SECURITY_MIRROR bookworm-security main"
    mv "$ROOTFS.tmp" "$ROOTFS"
fi

# ------------------------------------------------------------------ 3. import
if "${PODMAN[@]}" image exists "$BASE"; then
    say "base image: $BASE in $STORE"
else
    say "base image: podman import $ROOTFS $BASE"
    "${PODMAN[@]}" import --quiet "$ROOTFS" "$BASE" >/dev/null
fi

# ------------------------------------------------------------------ 4. build
# pip in the build stage trusts what pip here trusts: a proxy's CA bundle
# (PIP_CERT) goes in as a build secret, mounted for the RUN steps only.
SECRETS=()
if [ -n "${PIP_CERT:-}" ] && [ -s "$PIP_CERT" ]; then
    SECRETS=(--secret "id=pip-ca,src=$PIP_CERT")
fi
say "podman build -f Containerfile -t $IMAGE (BASE_IMAGE=$BASE)"
nice -n 10 "${PODMAN[@]}" build "${RUNTIME[@]}" "${ULIMITS[@]}" "${SECRETS[@]}" --network host \
    --pull=never --layers --build-arg "BASE_IMAGE=$BASE" -f "$REPO/Containerfile" \
    -t "$IMAGE" "$REPO"
image_id="$("${PODMAN[@]}" image inspect --format '{{.Id}}' "$IMAGE")"
# Intermediate layers stay in the store: they are the cache of the next build
# (`make clean` removes the store).

# ------------------------------------------------------------------ 5. the archive
if [ -s "$ARCHIVE" ] && [ "$(cat "$ARCHIVE.id" 2>/dev/null)" = "$image_id" ]; then
    say "archive: $ARCHIVE is image ${image_id:0:12} already"
else
    say "archive: podman save --format oci-archive -> $ARCHIVE"
    rm -f "$ARCHIVE.tmp"
    "${PODMAN[@]}" save --quiet --format oci-archive -o "$ARCHIVE.tmp" "$IMAGE"
    mv "$ARCHIVE.tmp" "$ARCHIVE"
    printf '%s\n' "$image_id" >"$ARCHIVE.id"
fi
size="$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")"
say "done in $((SECONDS - START))s: $IMAGE ${image_id:0:12}, $((size / 1000000)) MB unpacked," \
    "archive $(($(stat -c %s "$ARCHIVE") / 1000000)) MB"
