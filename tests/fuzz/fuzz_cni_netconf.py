"""Fuzz target: the CNI plugin's input (nodeproxy.cni: netconf, CNI_ARGS, the pod's
identity, prevResult) through ``nodeproxy.cni.plugin.run``, the whole of one invocation.

One input is the network configuration the runtime writes on stdin (seeds: conflist
entries as containerd and CRI-O send them, with prevResult, args.cni hints, odd types).
Each input is run as ADD, CHECK and DEL, against a daemon that is down and against one
that answers (with the pod enrolled, with this netns and its IPs).  The control socket is
a stand-in (no socket is opened) and the plugin's log file is never opened: a fuzzed
``logFile`` or ``controlSocket`` must not touch this machine.

Invariants:
- ``run`` returns, never raises: a success (exit 0) prints prevResult unchanged (ADD,
  CHECK) or nothing (DEL); a failure (exit 1) prints the spec's error JSON with a
  documented code and a message;
- what the plugin sends the daemon is a workload whose IPs are strings from prevResult.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any
from unittest import mock

from nodeproxy.cni import plugin, spec

ENV = {
    "CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/var/run/netns/cni-1234", "CNI_IFNAME": "eth0",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;"
                "K8S_POD_UID=0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
}
CODES = {spec.INCOMPATIBLE_VERSION, spec.UNSUPPORTED_FIELD, spec.UNKNOWN_CONTAINER,
         spec.INVALID_ENVIRONMENT, spec.IO_FAILURE, spec.DECODE_FAILURE,
         spec.INVALID_NETWORK_CONFIG, spec.TRY_AGAIN_LATER, spec.NOT_ENROLLED,
         spec.ENROLL_REFUSED, spec.POD_CGROUP_UNKNOWN}


class _Daemon:
    """The control socket: down, or up with the pod enrolled as the ADD described it."""

    def __init__(self, up: bool) -> None:
        self.up = up
        self.posted: list[Any] = []

    def request(self, socket_path: str, method: str, path: str, body: Any = None,
                timeout: float = 30.0) -> tuple[int, Any]:
        assert isinstance(socket_path, str) and isinstance(timeout, float)
        if not self.up:
            raise ConnectionRefusedError(111, "Connection refused")
        if method == "POST":
            self.posted.append(body)
            return 200, {"enrolled": True}
        if method == "GET" and path == "/v1/pods":
            return 200, [{"namespace": "shop", "name": "web-1", "netns": ENV["CNI_NETNS"],
                          "ips": ["10.244.1.10"]}]
        if method == "GET":
            return 404, {"error": "not found"}
        return 200, {}


def _check_run(command: str, daemon: _Daemon, stdin: bytes) -> None:
    prev_result: Any = None
    with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
        decoded = json.loads(stdin)
        prev_result = decoded.get("prevResult") if isinstance(decoded, dict) else None
    with mock.patch.object(plugin.control_client, "request", daemon.request), \
            mock.patch.object(plugin, "_setup_logging", lambda log_file: None):
        status, out = plugin.run({**ENV, "CNI_COMMAND": command}, stdin)
    json.dumps(out)  # what main() prints must be JSON
    if status == 0:
        if command == "DEL":
            assert out is None, f"DEL printed {out!r}"
        elif command == "ADD":
            assert out == prev_result, "ADD did not print prevResult unchanged"
        else:
            assert out is None or out == prev_result
    else:
        assert status == 1 and isinstance(out, dict), (status, out)
        assert out.get("code") in CODES, f"undocumented error code {out.get('code')!r}"
        assert isinstance(out.get("msg"), str) and out["msg"]
    for body in daemon.posted:
        assert isinstance(body, dict) and all(isinstance(ip, str) for ip in body["ips"]), body
        assert isinstance(body["cgroup"], str) and isinstance(body["serviceAccount"], str)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in body["labels"].items())


def check(data: bytes) -> None:
    log = logging.getLogger("nodeproxy-cni")
    disabled, log.disabled = log.disabled, True  # it logs every refusal: no use here
    try:
        for up in (False, True):
            for command in ("ADD", "CHECK", "DEL"):
                _check_run(command, _Daemon(up), data)
    finally:
        log.disabled = disabled
