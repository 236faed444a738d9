"""The label vocabulary of the proxy's series: which labels a connection's and a request's
series carry (Istio's names, in Istio's order) and the frozen records of their values.

``TcpLabels`` is one proxied connection's; ``RequestLabels`` one request's, built once per
client connection and destination (``RequestLabels.from_tcp``).  The counters that use
them (proxy_metrics.py, request_metrics.py) and the live view (live_stats.py) all import
them from here, so none of those imports another for its labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# What a label nodeproxy cannot know says (Istio's value).
UNKNOWN = "unknown"

TCP_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "connection_security_policy",
)


@dataclass(frozen=True)
class TcpLabels:
    """Label values of one proxied connection, in TCP_LABELS order."""

    reporter: str
    source_workload: str
    source_workload_namespace: str
    source_principal: str
    destination_workload: str
    destination_workload_namespace: str
    destination_principal: str
    destination_service: str
    connection_security_policy: str

    def values(self) -> tuple[str, ...]:
        return tuple(getattr(self, name) for name in TCP_LABELS)


# Istio's value for an unknown canonical revision.
LATEST = "latest"
# The labels every request series carries, as Istio names them.
REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)

# Set per response, not per request stream: observe()'s arguments.
RESPONSE_LABELS = ("response_code", "grpc_response_status", "response_flags")


def _service_name_and_namespace(service: str, workload_namespace: str) -> tuple[str, str]:
    """destination_service_name/namespace from destination_service, as Istio derives them:
    <name>.<namespace>.svc.<domain> gives name and namespace; any other value (a Host
    header, an address) is the name whole, and the namespace is the destination
    workload's."""
    parts = service.split(".")
    if len(parts) >= 4 and parts[2] == "svc":
        return parts[0], parts[1]
    return service, workload_namespace


@dataclass(frozen=True)
class RequestLabels:
    """Label values of one request, all but the RESPONSE_LABELS (REQUEST_LABELS order).

    One client connection to one destination usually shares one RequestLabels for all its
    requests: build it once (``from_tcp``) and pass it to every ``observe``.
    """

    reporter: str
    source_workload: str
    source_workload_namespace: str
    source_principal: str
    destination_workload: str
    destination_workload_namespace: str
    destination_principal: str
    destination_service: str
    request_protocol: str
    connection_security_policy: str
    source_app: str = UNKNOWN
    source_version: str = UNKNOWN
    source_canonical_service: str = UNKNOWN
    source_canonical_revision: str = LATEST
    source_cluster: str = UNKNOWN
    destination_app: str = UNKNOWN
    destination_version: str = UNKNOWN
    destination_service_name: str = UNKNOWN
    destination_service_namespace: str = UNKNOWN
    destination_canonical_service: str = UNKNOWN
    destination_canonical_revision: str = LATEST
    destination_cluster: str = UNKNOWN
    # The values in REQUEST_LABELS order, without the response labels (computed once).
    _values: tuple[str, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_values", tuple(
            getattr(self, name) for name in REQUEST_LABELS if name not in RESPONSE_LABELS))

    def values(self) -> tuple[str, ...]:
        """Label values in REQUEST_LABELS order, the three response labels left out."""
        return self._values

    @classmethod
    def from_tcp(cls, tcp: TcpLabels, request_protocol: str, **extra: str) -> RequestLabels:
        """A connection's TCP labels plus what HTTP adds.

        destination_service_name/namespace come from destination_service; the canonical
        services are the workloads (nodeproxy's workload label already is the canonical
        name, by Istio's rule); ``extra`` sets or overrides any other label (source_app,
        destination_version, ...).
        """
        name, namespace = (
            (UNKNOWN, UNKNOWN) if tcp.destination_service == UNKNOWN
            else _service_name_and_namespace(tcp.destination_service,
                                             tcp.destination_workload_namespace))
        values: dict[str, Any] = {name: getattr(tcp, name) for name in TCP_LABELS}
        values.update({
            "request_protocol": request_protocol,
            "source_canonical_service": tcp.source_workload,
            "destination_canonical_service": tcp.destination_workload,
            "destination_service_name": name,
            "destination_service_namespace": namespace,
        })
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(extra) - known
        if unknown:
            raise TypeError(f"not request labels: {sorted(unknown)}")
        values.update(extra)
        return cls(**values)
