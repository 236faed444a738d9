"""The vocabulary of the suite: paths, servers, routes, metrics and measured cells."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class NetPath(StrEnum):
    """Where the server is, seen from the clients on node0."""

    SAME_NODE = "same-node"
    CROSS_NODE = "cross-node"

    @property
    def node(self) -> str:
        return "node0" if self is NetPath.SAME_NODE else "node1"

    @property
    def label(self) -> str:
        return "same node" if self is NetPath.SAME_NODE else "cross node"


class ServerKind(StrEnum):
    """The servers every server pod runs, each on its own port."""

    SOCKPERF = "sockperf"
    IPERF3 = "iperf3"
    HTTP = "http"  # nginx serving a small file
    ECHO = "echo"  # the testbed peer server (transfer / ping-pong / whoami)
    GRPC = "grpc"  # the gRPC unary benchmark's server (bench/grpcunary.py)

    @property
    def port(self) -> int:
        return {"sockperf": 11111, "iperf3": 5201, "http": 8080, "echo": 7000,
                "grpc": 50051}[self.value]


class MeasurementError(RuntimeError):
    """A measurement ran but produced no usable figure; the message says why."""


@dataclass(frozen=True)
class ProxyProcess:
    """A proxy process on a route, whose CPU time and memory are accounted."""

    name: str
    pid: int


@dataclass(frozen=True)
class RequestCounter:
    """Where nodeproxy counts the HTTP requests of a route it parses: the
    ``istio_requests_total`` samples (reporter=source) of one node's daemon for one
    destination service.  ``parsed``: the configuration claims L7 (every request the
    client made is counted there) or L4 (none is: the bytes are relayed unparsed)."""

    node: str
    service: str  # destination_service_name
    parsed: bool


@dataclass(frozen=True)
class Route:
    """How a configuration's client reaches one server: from which pod, to which address."""

    client_pod: str
    host: str
    port: int
    proxies: tuple[ProxyProcess, ...] = ()
    counter: RequestCounter | None = None  # nodeproxy's request count for an HTTP route

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Metric:
    """One figure of the report, measured for each configuration it applies to."""

    key: str
    title: str
    unit: str
    better: str  # "lower" or "higher"
    needs_proxy: bool = False  # direct has no figure (no proxy on the path)
    only: tuple[str, ...] = ()  # if set, only these configurations have the figure
    digits: int = 1
    http: bool = False  # an HTTP figure: the HTTP-only configurations (L7) have it too

    def not_applicable(self, configuration: str, has_proxy: bool,
                       http_only: bool = False) -> str | None:
        """Why this metric has no figure for that configuration, or None if it has one.
        ``http_only``: the configuration is measured in the HTTP scenarios only."""
        if self.only and configuration not in self.only:
            return f"only measured for {', '.join(self.only)}"
        if self.needs_proxy and not has_proxy:
            return "no proxy on the path"
        if http_only and not self.http:
            return "an HTTP (L7) configuration: measured in the HTTP scenarios only"
        return None


@dataclass(frozen=True)
class Added:
    """A figure derived after the run: a configuration's ``of`` figure minus direct's
    of the same round and block (e.g. the latency a proxy adds)."""

    metric: Metric
    of: str  # the key of the measured figure


@dataclass
class Cell:
    """Every sample of one metric for one configuration, and why some are missing."""

    samples: list[float] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # the round of each sample (0: once)
    # The block of the round each sample was taken in (configurations needing other daemon
    # settings are measured in blocks; direct is measured in each, to pair with).
    blocks: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    not_applicable: str | None = None

    def add(self, value: float, round_number: int, block: int = 0) -> None:
        self.samples.append(value)
        self.rounds.append(round_number)
        self.blocks.append(block)

    def by_round(self) -> dict[int, float]:
        """One sample per round (the first, where a round has several)."""
        out: dict[int, float] = {}
        for r, value in zip(self.rounds, self.samples, strict=True):
            out.setdefault(r, value)
        return out

    def by_slot(self) -> dict[tuple[int, int], float]:
        return dict(zip(zip(self.rounds, self.blocks, strict=True), self.samples, strict=True))

    @property
    def measured(self) -> bool:
        return bool(self.samples)
