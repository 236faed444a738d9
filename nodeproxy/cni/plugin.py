"""`nodeproxy-cni`: the chained CNI plugin (spec 1.0.0: ADD, DEL, CHECK, VERSION).

The runtime runs it after the primary plugin with the CNI_* environment and the
network configuration (with ``prevResult``) on stdin.

- ADD: enroll the pod in the node daemon (``POST /v1/pods`` on the control
  socket) and print ``prevResult`` unchanged, only once the daemon answered
  200, so capture is in place before the pod's containers start.  A daemon that
  cannot be reached fails the ADD (code 11, "try again later": the kubelet
  retries) unless the netconf says ``failOpen: true``; a daemon that refuses the
  pod fails it with code 101 and the daemon's reason.
- DEL: unenroll (``DELETE /v1/pods/{ns}/{name}``) if the pod is enrolled with
  this sandbox's netns; idempotent, and it succeeds when the pod is unknown,
  the netns is gone or the daemon is down (a daemon that comes back starts
  without the pod; one that stays up also drops pods whose netns vanished).
- CHECK: the daemon must list the pod with this netns and these IPs (code 100
  otherwise).
- VERSION: the supported spec versions.

Errors are the spec's error JSON on stdout with exit status 1.  Pods of an
``excludeNamespaces`` namespace, or labelled ``nodeproxy.io/dataplane-mode=none``,
are passed through without enrollment.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodeproxy.admin import control_client
from nodeproxy.cni import netconf, pod
from nodeproxy.cni.spec import (
    CHECK_SINCE,
    ENROLL_REFUSED,
    INCOMPATIBLE_VERSION,
    INVALID_ENVIRONMENT,
    INVALID_NETWORK_CONFIG,
    NOT_ENROLLED,
    SPEC_VERSION,
    SUPPORTED_VERSIONS,
    TRY_AGAIN_LATER,
    CniError,
    parse_cni_args,
    version_key,
    version_result,
)

log = logging.getLogger("nodeproxy-cni")


@dataclass(frozen=True)
class Invocation:
    """One call of the plugin: its command, environment and network configuration."""

    command: str
    container_id: str
    netns: str
    cni_args: dict[str, str]
    conf: netconf.NetConf


class DaemonUnreachable(Exception):
    """The control socket did not answer (absent, refused, timed out, or daemon starting)."""


def _ask(conf: netconf.NetConf, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    try:
        status, data = control_client.request(conf.control_socket, method, path, body,
                                              timeout=conf.timeout_seconds)
    except (OSError, http.client.HTTPException) as e:
        raise DaemonUnreachable(f"nodeproxy daemon unreachable at {conf.control_socket}: "
                                f"{e}") from e
    if status == 503:
        raise DaemonUnreachable(f"nodeproxy daemon at {conf.control_socket} is not ready yet")
    return status, data


def _unreachable(e: DaemonUnreachable) -> CniError:
    return CniError(TRY_AGAIN_LATER, str(e),
                    "the node's nodeproxy daemon must be running for pods to start "
                    "(fail closed); set failOpen: true in the plugin's config to start "
                    "them unmeshed instead")


def _require_prev_result(inv: Invocation) -> dict[str, Any]:
    if inv.conf.prev_result is None:
        raise CniError(INVALID_NETWORK_CONFIG,
                       f"{inv.command} needs prevResult: nodeproxy-cni is a chained plugin; "
                       "list it after the primary plugin in a conflist")
    return inv.conf.prev_result


def _require_netns(inv: Invocation) -> str:
    if not inv.netns:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS is not set ({inv.command} needs the "
                                            "pod's network namespace)")
    return inv.netns


def cmd_add(inv: Invocation) -> dict[str, Any]:
    prev = _require_prev_result(inv)
    netns = _require_netns(inv)
    info = pod.pod_info(inv.conf, inv.cni_args)
    reason = pod.skip_reason(inv.conf, info)
    if reason:
        log.info("ADD %s: not enrolled: %s", info.key, reason)
        return prev
    ips = pod.result_ips(prev)
    if not ips:
        raise CniError(INVALID_NETWORK_CONFIG,
                       f"prevResult gives pod {info.key} no IP address to enroll")
    body = pod.workload(info, netns, pod.pod_cgroup(inv.conf, info), ips)
    try:
        status, data = _ask(inv.conf, "POST", "/v1/pods", body)
    except DaemonUnreachable as e:
        if inv.conf.fail_open:
            log.warning("ADD %s: failOpen: %s; the pod starts outside the mesh", info.key, e)
            return prev
        raise _unreachable(e) from e
    if status != 200:
        raise CniError(ENROLL_REFUSED, f"nodeproxy daemon refused pod {info.key} "
                                       f"(HTTP {status})", json.dumps(data))
    if isinstance(data, dict) and "skipped" in data:
        # The daemon's Kubernetes view says the pod is not meshed (opt-in/opt-out labels).
        log.info("ADD %s: not enrolled: %s", info.key, data.get("reason"))
        return prev
    log.info("ADD %s: enrolled (%s)", info.key, json.dumps(data))
    return prev


def _enrolled_entry(conf: netconf.NetConf, namespace: str, name: str) -> dict[str, Any] | None:
    """The daemon's view of the pod (GET /v1/pods), or None when it does not have it."""
    status, pods = _ask(conf, "GET", "/v1/pods")
    if status != 200 or not isinstance(pods, list):
        raise CniError(ENROLL_REFUSED, f"nodeproxy daemon answered GET /v1/pods with HTTP "
                                       f"{status}", json.dumps(pods))
    return next((p for p in pods if isinstance(p, dict) and p.get("namespace") == namespace
                 and p.get("name") == name), None)


def cmd_del(inv: Invocation) -> None:
    """Unenroll, but only the enrollment this sandbox made.

    The daemon knows pods by name, and a pod's sandbox can be replaced: a late
    DEL of an old sandbox (or the DEL that follows a refused ADD) must not
    release the pod's current sandbox.  So the pod is unenrolled only when it
    is enrolled with this CNI_NETNS, or, with CNI_NETNS empty, when the netns it
    was enrolled with is gone.
    """
    names = pod.pod_names(inv.cni_args)
    if names is None:
        log.info("DEL %s: CNI_ARGS names no pod; nothing to unenroll", inv.container_id)
        return
    namespace, name = names
    try:
        entry = _enrolled_entry(inv.conf, namespace, name)
        if entry is None:
            log.info("DEL %s/%s: not enrolled", namespace, name)
            return
        enrolled_netns = str(entry.get("netns") or "")
        if inv.netns and enrolled_netns != inv.netns:
            log.info("DEL %s/%s: left enrolled: its enrollment is for netns %s, not %s",
                     namespace, name, enrolled_netns, inv.netns)
            return
        if not inv.netns and enrolled_netns and os.path.exists(enrolled_netns):
            log.info("DEL %s/%s: no CNI_NETNS, and the enrolled netns %s still exists: "
                     "left enrolled (the daemon drops it when that netns goes)",
                     namespace, name, enrolled_netns)
            return
        status, data = _ask(inv.conf, "DELETE", f"/v1/pods/{namespace}/{name}")
    except DaemonUnreachable as e:
        log.warning("DEL %s/%s: %s; nothing to unenroll", namespace, name, e)
        return
    if status not in (200, 404):
        raise CniError(ENROLL_REFUSED, f"nodeproxy daemon could not unenroll pod "
                                       f"{namespace}/{name} (HTTP {status})", json.dumps(data))
    log.info("DEL %s/%s: %s", namespace, name, "unenrolled" if status == 200 else "not enrolled")


def _skipped_by_daemon(conf: netconf.NetConf, namespace: str, name: str) -> bool:
    """Did the daemon leave this pod out of the mesh on purpose (labels, via the API)?"""
    status, data = _ask(conf, "GET", f"/v1/pods/{namespace}/{name}")
    return status == 200 and isinstance(data, dict) and "skipped" in data


def cmd_check(inv: Invocation) -> None:
    if version_key(inv.conf.cni_version) < version_key(CHECK_SINCE):
        raise CniError(INCOMPATIBLE_VERSION,
                       f"CHECK is not defined for CNI version {inv.conf.cni_version}")
    prev = _require_prev_result(inv)
    netns = _require_netns(inv)
    info = pod.pod_info(inv.conf, inv.cni_args)
    if pod.skip_reason(inv.conf, info):
        return
    try:
        entry = _enrolled_entry(inv.conf, info.namespace, info.name)
    except DaemonUnreachable as e:
        if inv.conf.fail_open:
            log.warning("CHECK %s: failOpen: %s", info.key, e)
            return
        raise _unreachable(e) from e
    if entry is None and _skipped_by_daemon(inv.conf, info.namespace, info.name):
        return
    if entry is None:
        raise CniError(NOT_ENROLLED, f"pod {info.key} is not enrolled in the mesh",
                       f"the daemon at {inv.conf.control_socket} does not list it")
    problems = []
    if entry.get("netns") != netns:
        problems.append(f"enrolled with netns {entry.get('netns')}, not {netns}")
    missing = sorted(set(pod.result_ips(prev)) - set(entry.get("ips") or []))
    if missing:
        problems.append(f"enrolled without IPs {', '.join(missing)}")
    if problems:
        raise CniError(NOT_ENROLLED, f"pod {info.key} is enrolled with other settings",
                       "; ".join(problems))


COMMANDS = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}


def _setup_logging(log_file: str | None) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("nodeproxy-cni: %(message)s"))
        log.addHandler(handler)
    if log_file:
        try:
            handler = logging.FileHandler(log_file)
        except OSError as e:
            log.warning("cannot log to %s: %s", log_file, e)
            return
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


def run(env: Mapping[str, str], stdin: bytes) -> tuple[int, dict[str, Any] | None]:
    """Run one invocation: (exit status, JSON to print or None)."""
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, version_result()
    version = SPEC_VERSION
    try:
        if command not in COMMANDS:
            raise CniError(INVALID_ENVIRONMENT,
                           f"unknown CNI_COMMAND {command!r}" if command
                           else "CNI_COMMAND is not set",
                           "nodeproxy-cni knows ADD, DEL, CHECK and VERSION")
        raw = netconf.decode(stdin)
        if raw.get("cniVersion") in SUPPORTED_VERSIONS:
            version = str(raw["cniVersion"])
        conf = netconf.parse(raw)
        _setup_logging(conf.log_file)
        container_id = env.get("CNI_CONTAINERID", "")
        if not container_id:
            raise CniError(INVALID_ENVIRONMENT, "CNI_CONTAINERID is not set")
        inv = Invocation(command=command, container_id=container_id,
                         netns=env.get("CNI_NETNS", ""),
                         cni_args=parse_cni_args(env.get("CNI_ARGS", "")), conf=conf)
        result = COMMANDS[command](inv)
    except CniError as e:
        log.error("%s failed: %s%s", command or "(no command)", e.msg,
                  f" ({e.details})" if e.details else "")
        return 1, e.to_json(version)
    return 0, result


def main() -> int:
    _setup_logging(None)
    status, out = run(os.environ, sys.stdin.buffer.read())
    if out is not None:
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    sys.exit(main())
