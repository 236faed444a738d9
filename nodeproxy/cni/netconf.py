"""The plugin's network configuration (its entry in the conflist, as the runtime sends it).

Keys of the plugin's own, all optional::

    {
      "type": "nodeproxy-cni",
      "controlSocket": "/run/nodeproxy/control.sock",  # the daemon's control socket
      "failOpen": false,          # daemon unreachable on ADD/CHECK: pass (logged), not fail
      "timeoutSeconds": 30,       # how long to wait for the daemon's answer
      "excludeNamespaces": ["kube-system"],  # pods of these namespaces are never enrolled
      "cgroupRoot": "/sys/fs/cgroup",  # cgroup v2 mount (default: found in /proc/mounts)
      "logFile": "/var/log/nodeproxy-cni.log",  # also log there (stderr always)
      "args": {"cni": {            # per-pod hints a runtime or an operator may add
        "serviceAccount": "web", "labels": {"app": "web"}, "cgroup": "/sys/fs/cgroup/..."
      }}
    }

Unknown keys are ignored, as CNI conventions ask: the runtime adds its own
(``name``, ``prevResult``, ``runtimeConfig`` ...).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from nodeproxy.cni.spec import (
    DECODE_FAILURE,
    INVALID_NETWORK_CONFIG,
    CniError,
    check_version,
)

DEFAULT_CONTROL_SOCKET = "/run/nodeproxy/control.sock"
DEFAULT_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class NetConf:
    """The parsed stdin of one plugin invocation."""

    cni_version: str
    name: str
    control_socket: str = DEFAULT_CONTROL_SOCKET
    fail_open: bool = False
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    exclude_namespaces: tuple[str, ...] = ()
    cgroup_root: str | None = None
    log_file: str | None = None
    prev_result: dict[str, Any] | None = None
    hints: dict[str, Any] = field(default_factory=dict)  # args.cni


def _typed(conf: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = conf.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise CniError(INVALID_NETWORK_CONFIG, f"network configuration: {key!r} must be {what}",
                       f"got {json.dumps(value)}")
    return value


def _path(conf: dict[str, Any], key: str) -> str | None:
    """A path-valued key: a string the OS can take (no NUL byte)."""
    value = _typed(conf, key, str, "a path")
    if value is not None and "\x00" in value:
        raise CniError(INVALID_NETWORK_CONFIG,
                       f"network configuration: {key!r} must be a path (it holds a NUL byte)")
    return value


def decode(raw: bytes | str) -> dict[str, Any]:
    """stdin as a JSON object, or a CniError (code 6)."""
    try:
        conf = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        # RecursionError: nesting deeper than the interpreter's stack (``[[[[...``).
        raise CniError(DECODE_FAILURE, "network configuration on stdin is not valid JSON",
                       str(e)) from e
    if not isinstance(conf, dict):
        raise CniError(DECODE_FAILURE, "network configuration on stdin is not a JSON object")
    return conf


def parse(conf: dict[str, Any]) -> NetConf:
    """Check and convert a decoded network configuration."""
    version = check_version(conf.get("cniVersion"))
    timeout = _typed(conf, "timeoutSeconds", (int, float), "a number of seconds")
    if timeout is not None and not 0 < timeout <= 600:
        raise CniError(INVALID_NETWORK_CONFIG,
                       "network configuration: 'timeoutSeconds' must be in (0, 600]")
    excluded = _typed(conf, "excludeNamespaces", list, "a list of namespace names") or []
    if not all(isinstance(ns, str) for ns in excluded):
        raise CniError(INVALID_NETWORK_CONFIG,
                       "network configuration: 'excludeNamespaces' must list strings")
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(INVALID_NETWORK_CONFIG, "network configuration: 'prevResult' "
                       "must be an object (the previous plugin's result)")
    if prev is not None and not isinstance(prev.get("ips") or [], list):
        raise CniError(INVALID_NETWORK_CONFIG, "network configuration: 'prevResult.ips' "
                       "must be a list (the previous plugin's addresses)")
    args = _typed(conf, "args", dict, "an object") or {}
    hints = args.get("cni")
    hints = {} if hints is None else hints
    if not isinstance(hints, dict):
        raise CniError(INVALID_NETWORK_CONFIG, "network configuration: 'args.cni' must be an "
                       "object")
    return NetConf(
        cni_version=version,
        name=str(conf.get("name") or ""),
        control_socket=_path(conf, "controlSocket") or DEFAULT_CONTROL_SOCKET,
        fail_open=bool(_typed(conf, "failOpen", bool, "true or false")),
        timeout_seconds=float(timeout or DEFAULT_TIMEOUT_SECONDS),
        exclude_namespaces=tuple(excluded),
        cgroup_root=_path(conf, "cgroupRoot"),
        log_file=_path(conf, "logFile"),
        prev_result=prev,
        hints=hints,
    )
