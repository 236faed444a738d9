"""How long and how often each measurement runs: the quick (CI) and the full profile."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Settings:
    """Every knob of one benchmark run; all loops are bounded by these."""

    profile: str
    rounds: int
    sockperf_seconds: float  # sockperf -t (it adds ~2.2 s of its own set-up and warm-up)
    sockperf_message: int  # bytes per ping-pong message
    iperf_seconds: float
    iperf_streams: tuple[int, ...]
    wrk_seconds: float
    wrk_connections: int
    http_body: int  # size of the file nginx serves
    connect_seconds: float
    connect_concurrency: int
    connect_max: int  # connections per connection-rate run, at most
    sustained_seconds: float  # one sustained-connect run: back-to-back short connections
    sustained_window: float  # the rate is reported per window of this many seconds
    idle_connections: int
    enroll_pods: int
    tool_margin: float = 20.0  # seconds a tool may overrun its own duration before it is killed
    noisy_seconds: float = 5.0  # each phase of the noisy-neighbour scenario (quiet pod's wrk)
    # HTTP/2 (h2load): this many requests, over h2_connections connections with
    # h2_streams requests in flight on each; gRPC unary: this many calls, grpc_concurrency
    # in flight on one channel.  Counts, not durations: every request is checked.
    h2_requests: int = 4000
    h2_connections: int = 16
    h2_streams: int = 8
    grpc_calls: int = 3000
    grpc_concurrency: int = 16
    # Connection capacity: open this many at a time, up to capacity_max (fewer where the
    # open-file limits say so), within capacity_deadline seconds per configuration.
    capacity_max: int = 400
    capacity_step: int = 100
    capacity_deadline: float = 60.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["iperf_streams"] = list(self.iperf_streams)
        return out


QUICK = Settings(
    profile="quick", rounds=1, sockperf_seconds=1.0, sockperf_message=64, iperf_seconds=1.0,
    iperf_streams=(1, 8), wrk_seconds=1.0, wrk_connections=32, http_body=1024,
    connect_seconds=0.5, connect_concurrency=16, connect_max=5000, sustained_seconds=6.0,
    sustained_window=2.0, idle_connections=300,
    enroll_pods=20, noisy_seconds=4.0,
)

FULL = Settings(
    profile="full", rounds=5, sockperf_seconds=4.0, sockperf_message=64, iperf_seconds=4.0,
    iperf_streams=(1, 8), wrk_seconds=4.0, wrk_connections=32, http_body=1024,
    connect_seconds=3.0, connect_concurrency=16, connect_max=20000, sustained_seconds=60.0,
    sustained_window=5.0, idle_connections=10000,
    enroll_pods=100, noisy_seconds=6.0, h2_requests=10000, grpc_calls=6000,
    capacity_max=60000, capacity_step=1000, capacity_deadline=300.0,
)


def choose(quick: bool, rounds: int | None = None) -> Settings:
    """The quick or full profile, with the number of rounds overridden if asked."""
    settings = QUICK if quick else FULL
    if rounds is not None:
        if not 1 <= rounds <= 50:
            raise ValueError("--rounds must be between 1 and 50")
        settings = replace(settings, rounds=rounds)
    return settings
