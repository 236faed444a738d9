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

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nodeproxy.mesh.destinations import ServicePortEntry, WorkloadRef
from nodeproxy.mesh.enrolled_pod import EnrolledPod
from nodeproxy.telemetry.labels import UNKNOWN

if TYPE_CHECKING:
    from nodeproxy.http.body_tap import BodyTap
    from nodeproxy.http.pool import Endpoint


@dataclass(frozen=True)
class RequestContext:
    """The client connection a request arrived on."""

    pod: EnrolledPod
    entry: ServicePortEntry
    version: int  # the client's address family
    http2_upstream: bool
    access_log: bool


@dataclass(init=False)
class Outcome:
    """What one request did, for its metric and its access-log line.  (Its own __init__,
    compiled in a compiled build: see codec/message.py's RequestHead.)"""

    flags: list[str]
    attempts: int
    tried: set[str]  # endpoint keys earlier attempts went to
    status: int
    grpc_status: str  # Istio leaves it empty for requests that are not gRPC
    endpoint: Endpoint | None
    destination: WorkloadRef | None
    service: str
    bytes_sent: int
    route: str | None  # the matched rule's HTTPRoute ("" default, None: no match)
    mirror_tap: BodyTap | None  # the request's body, copied for mirrors

    def __init__(self, flags: list[str] | None = None, attempts: int = 0,
                 tried: set[str] | None = None, status: int = 0, grpc_status: str = "",
                 endpoint: Endpoint | None = None, destination: WorkloadRef | None = None,
                 service: str = UNKNOWN, bytes_sent: int = 0, route: str | None = None,
                 mirror_tap: BodyTap | None = None):
        self.flags = flags if flags is not None else []
        self.attempts = attempts
        self.tried = tried if tried is not None else set()
        self.status = status
        self.grpc_status = grpc_status
        self.endpoint = endpoint
        self.destination = destination
        self.service = service
        self.bytes_sent = bytes_sent
        self.route = route
        self.mirror_tap = mirror_tap

    @property
    def flag_text(self) -> str:
        return ",".join(dict.fromkeys(self.flags)) or "-"
