"""An enrolled pod: its workload, identity, network namespace and kernel id."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field

from nodeproxy.capture.namespaces import Netns
from nodeproxy.config.model import Workload
from nodeproxy.mesh.destinations import WorkloadRef
from nodeproxy.telemetry.labels import UNKNOWN, TcpLabels


@dataclass
class EnrolledPod:
    workload: Workload
    ref: WorkloadRef
    principal: str
    pod_id: int
    netns: Netns
    netns_cookie: int
    source: str  # "config" or "runtime"
    # Outbound and tunnel listeners (closed first on shutdown and handover).
    listeners: list[asyncio.AbstractServer] = field(default_factory=list)
    # Inbound (15006) listeners: kept open while draining so inbound capture keeps steering
    # (and refusing) plaintext instead of letting it reach the application directly.
    inbound_listeners: list[asyncio.AbstractServer] = field(default_factory=list)
    flags: int = 0  # pod_info.flags in the kernel (POD_NO_IPV6)

    @functools.cached_property
    def key(self) -> str:
        """namespace/name, made once: every connection of the pod names it (a re-applied
        workload keeps its namespace and name, nodeproxy.pods.enrollment)."""
        return self.workload.key


def destination_labels(pod: EnrolledPod, source: WorkloadRef | None, principal: str | None,
                       security: str) -> TcpLabels:
    """Istio's labels for a connection this node delivers into one of its pods."""
    return TcpLabels(
        reporter="destination",
        source_workload=source.workload if source else UNKNOWN,
        source_workload_namespace=source.namespace if source else UNKNOWN,
        source_principal=principal or UNKNOWN,
        destination_workload=pod.ref.workload,
        destination_workload_namespace=pod.workload.namespace,
        destination_principal=pod.principal,
        destination_service=UNKNOWN,
        connection_security_policy=security,
    )
