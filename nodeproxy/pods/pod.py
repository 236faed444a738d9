"""An enrolled pod: its workload, identity, network namespace and kernel id."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from nodeproxy.config.model import Workload
from nodeproxy.pods.netns import Netns
from nodeproxy.proxy.destinations import WorkloadRef


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


@dataclass
class EnrolledPod:
    workload: Workload
    ref: WorkloadRef
    principal: str
    pod_id: int
    netns: Netns
    netns_cookie: int
    source: str  # "config" or "runtime"
    listeners: list[asyncio.AbstractServer] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.workload.key
