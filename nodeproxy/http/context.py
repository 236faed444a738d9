"""What one request carries along the L7 path: its client connection's facts and its
outcome so far.

``RequestContext`` is fixed when a client connection is served (client_connections.py) and
read by every later stage: the source pod, the service port the client dialled, the
client's address family, the upstream protocol and whether to write access-log lines.
``Outcome`` is filled in as the request goes (handler.py, router.py, local_reply.py) and
read once at its end (recorder.py): flags, attempts, status, the endpoint and
destination chosen, bytes sent.  Plain data, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nodeproxy.mesh.destinations import ServicePortEntry, WorkloadRef
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.telemetry.proxy_metrics import UNKNOWN

if TYPE_CHECKING:
    from nodeproxy.http.mirror import BodyTap
    from nodeproxy.http.pool import Endpoint


@dataclass(frozen=True)
class RequestContext:
    """The client connection a request arrived on."""

    pod: EnrolledPod
    entry: ServicePortEntry
    version: int  # the client's address family
    http2_upstream: bool
    access_log: bool


@dataclass
class Outcome:
    """What one request did, for its metric and its access-log line."""

    flags: list[str] = field(default_factory=list)
    attempts: int = 0
    tried: set[str] = field(default_factory=set)  # endpoint keys earlier attempts went to
    status: int = 0
    grpc_status: str = ""  # Istio leaves it empty for requests that are not gRPC
    endpoint: Endpoint | None = None
    destination: WorkloadRef | None = None
    service: str = UNKNOWN
    bytes_sent: int = 0
    route: str | None = None  # the matched rule's HTTPRoute ("" default, None: no match)
    mirror_tap: BodyTap | None = None  # the request's body, copied for mirrors

    @property
    def flag_text(self) -> str:
        return ",".join(dict.fromkeys(self.flags)) or "-"
