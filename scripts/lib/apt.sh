# shellcheck shell=bash
# Debian packages, the one way the scripts check and install them (sourced by
# scripts/setup.sh, scripts/build-image.sh and scripts/vm_host.sh).

# apt_missing PKG...: print, one per line, the packages dpkg does not have installed.
apt_missing() {
    local pkg
    for pkg in "$@"; do
        [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" = "install ok installed" ] ||
            printf '%s\n' "$pkg"
    done
}

# apt_install PKG...: apt-get update, then install exactly these (no recommends).
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}
