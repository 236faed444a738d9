"""The adversarial tests' shared ground: a mesh whose backends are real nginx guarded by
L7 AuthorizationPolicies, an attacker pod beside them, and the backends' own access logs
as the judge of what got through.

Two policy variants, each on a backend on the attacker's node (near: the same node proxy
decides and connects) and on the other node (far: the request crosses HBONE):

- ``deny``: DENY paths ``/admin``, ``/admin/*``; DENY when ``x-role: blocked``.
- ``allow``: ALLOW only paths ``/public/*``, and ``/member/*`` when ``x-role: member``.

Every backend pod serves nginx (``nginx.guarded_config``) over HTTP/1.1 on 8080 and over
HTTP/2 cleartext on 8081, behind services ``<variant>-<site>`` (port 80, appProtocol
http) and ``<variant>-<site>-h2`` (port 80, appProtocol http2).  nginx logs what it made
of each request (its own normalized ``uri``, the first ``x_role``); ``violations`` lists
the logged requests the variant's policy forbids, so a test asserts the backend never
acted on a denied request, whatever the proxy answered.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nodeproxy_dev.testbed.cluster import Cluster

APP_H1 = 8080
APP_H2 = 8081
VARIANTS = ("deny", "allow")
SITES = {"near": "node0", "far": "node1"}
ATTACKER = "attacker"
NEIGHBOUR = "neighbour"

POLICIES: list[dict[str, Any]] = [
    {"name": "deny-admin", "namespace": "default", "selector": {"app": "deny-web"},
     "action": "DENY", "rules": [
         {"to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]},
         {"when": [{"key": "request.headers[x-role]", "values": ["blocked"]}]},
     ]},
    {"name": "allow-public", "namespace": "default", "selector": {"app": "allow-web"},
     "action": "ALLOW", "rules": [
         {"to": [{"operation": {"paths": ["/public/*"]}}]},
         {"to": [{"operation": {"paths": ["/member/*"]}}],
          "when": [{"key": "request.headers[x-role]", "values": ["member"]}]},
     ]},
]


@dataclass(frozen=True)
class Target:
    """One guarded backend and the two services in front of it."""

    variant: str  # "deny" or "allow"
    site: str  # "near" or "far"
    pod: str
    h1_service: str
    h2_service: str
    h1_dir: str  # nginx's directory (access.log) for HTTP/1.1
    h2_dir: str  # and for HTTP/2

    @property
    def name(self) -> str:
        return f"{self.variant}-{self.site}"


@dataclass
class HostileMesh:
    cluster: Cluster
    targets: dict[str, Target] = field(default_factory=dict)  # by Target.name

    def vip(self, service: str) -> str:
        return self.cluster.services[f"default/{service}"].vip4 or ""

    def raw(self, host: str, writes: Sequence[bytes], *, port: int = 80, gap: float = 0.0,
            read_seconds: float = 3.0, half_close: bool = False, pod: str = ATTACKER,
            timeout: float = 60.0) -> dict[str, Any]:
        """Run nodeproxy_dev.testbed.raw_exchange in the pod: the writes, then what came back
        (``received`` as bytes added to its JSON)."""
        first, *rest = writes
        argv = ["--host", host, "--port", str(port), "--send-hex", first.hex(),
                "--gap", str(gap), "--read-seconds", str(read_seconds)]
        for data in rest:
            argv += ["--then-hex", data.hex()]
        if half_close:
            argv.append("--half-close")
        out = self.cluster.run_in_pod(pod, [sys.executable, "-m",
                                            "nodeproxy_dev.testbed.raw_exchange", *argv],
                                      timeout=timeout, check=True)
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        result["received"] = bytes.fromhex(result["received_hex"])
        return result


def backend_log(directory: str) -> list[dict[str, Any]]:
    """The requests nginx served from `directory` (its access.log), oldest first."""
    path = os.path.join(directory, "access.log")
    if not os.path.exists(path):
        return []
    # nginx's escape=json passes bytes above 0x7f as they came (a hostile path's
    # overlong UTF-8, say): read them without failing, each as a lone surrogate.
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return [json.loads(line) for line in f if line.strip()]


def forbidden(variant: str, entry: Mapping[str, Any]) -> bool:
    """Does the variant's policy forbid the request nginx logged (as nginx understood it)?"""
    uri = str(entry.get("uri", ""))
    role = str(entry.get("x_role", ""))
    if variant == "deny":
        return uri == "/admin" or uri.startswith("/admin/") or role == "blocked"
    return not (uri.startswith("/public/") or (uri.startswith("/member/") and role == "member"))


def violations(target: Target) -> list[dict[str, Any]]:
    """Requests the target's nginx acted on that its policy forbids (both protocols)."""
    return [e for d in (target.h1_dir, target.h2_dir) for e in backend_log(d)
            if forbidden(target.variant, e)]


def build(cluster: Cluster, overrides: Mapping[str, Any] | None = None,
          extra_pods: Sequence[tuple[str, str]] = ()) -> HostileMesh:
    """Populate a fresh Cluster(2): the attacker and a neighbour pod on node0, the four
    guarded backends, their services and policies; `overrides` merge into the node YAML
    (their authorizationPolicies are added to POLICIES); `extra_pods`: (node, name) of
    more enrolled client pods.  Starts the daemons."""
    c = cluster
    mesh = HostileMesh(c)
    c.add_pod("node0", ATTACKER, labels={"app": ATTACKER}, service_account=ATTACKER,
              settings={"accessLog": True})
    c.add_pod("node0", NEIGHBOUR, labels={"app": NEIGHBOUR}, service_account=NEIGHBOUR)
    for node, name in extra_pods:
        c.add_pod(node, name, labels={"app": name}, service_account=name)
    for variant in VARIANTS:
        for site, node in SITES.items():
            pod = f"{variant}-{site}"
            c.add_pod(node, pod, labels={"app": f"{variant}-web", "site": site},
                      service_account=f"{variant}-web")
            h1_dir = c.serve_guarded(pod, APP_H1)
            h2_dir = c.serve_guarded(pod, APP_H2, http2=True)
            selector = {"app": f"{variant}-web", "site": site}
            c.add_service(pod, port=80, target_port=APP_H1, selector=selector,
                          app_protocol="http")
            c.add_service(f"{pod}-h2", port=80, target_port=APP_H2, selector=selector,
                          app_protocol="http2")
            mesh.targets[pod] = Target(variant, site, pod, pod, f"{pod}-h2", h1_dir, h2_dir)
    merged: dict[str, Any] = {"http": {"accessLog": {"path": os.path.join(c.dir,
                                                                            "access.log")}}}
    merged.update(overrides or {})
    merged["authorizationPolicies"] = [*POLICIES,
                                       *(overrides or {}).get("authorizationPolicies", [])]
    c.write_configs(overrides=merged)
    c.start_daemons()
    return mesh


def hostile_mesh(overrides: Mapping[str, Any] | None = None) -> Iterator[HostileMesh]:
    """A module fixture's body: ``yield from hostile_mesh()`` inside ``@pytest.fixture``."""
    with Cluster(2) as c:
        yield build(c, overrides)
