"""What the plugin needs from the CNI specification 1.0.0: versions, error codes, CNI_ARGS."""

from __future__ import annotations

from typing import Any

SPEC_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
# CHECK exists from 0.4.0 on.
CHECK_SINCE = "0.4.0"

# Well-known error codes (SPEC.md, "Error").
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_NETWORK_CONFIG = 7
TRY_AGAIN_LATER = 11

# This plugin's own codes (the spec reserves 100 and up for plugins).
NOT_ENROLLED = 100  # CHECK: the daemon does not have the pod
ENROLL_REFUSED = 101  # the daemon answered, and refused (invalid pod, conflict)
POD_CGROUP_UNKNOWN = 102  # no way to tell which cgroup holds the pod's processes


class CniError(Exception):
    """A failure reported to the runtime as the spec's error JSON on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = SPEC_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


def version_key(version: str) -> tuple[int, ...]:
    """'0.4.0' -> (0, 4, 0); raises ValueError for anything that is not dotted digits."""
    return tuple(int(part) for part in version.split("."))


def check_version(version: object) -> str:
    """The network config's cniVersion if this plugin speaks it, else a CniError."""
    if not isinstance(version, str) or not version:
        raise CniError(INVALID_NETWORK_CONFIG, "network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION,
                       f"incompatible CNI version {version}",
                       f"nodeproxy-cni supports {', '.join(SUPPORTED_VERSIONS)}")
    return version


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS 'K8S_POD_NAME=web;K8S_POD_NAMESPACE=shop' -> a dict; malformed pairs are errors."""
    args: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_ARGS: {pair!r} is not KEY=VALUE")
        args[key] = value
    return args


def version_result() -> dict[str, Any]:
    """What VERSION prints."""
    return {"cniVersion": SPEC_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}
