"""The tracker returns a connection's pod keys as it keeps them (tcp/tracker.py, interned
with what admitted it): the tuple a splice keeps is that shared one, not a tuple of its
own per connection, and what the tracker records per connection is unchanged (a vanished
pod's connections are still found and only they are reset)."""

from __future__ import annotations

from nodeproxy.tcp.tracker import ConnectionTracker


class _Relay:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


def test_add_returns_the_shared_pod_keys_and_abort_pod_still_finds_the_connections():
    tracker = ConnectionTracker()
    a, b, c = _Relay(), _Relay(), _Relay()
    first = tracker.add(a, "ns/p1", "ns/p2")  # type: ignore[arg-type]
    second = tracker.add(b, *("ns/p1", "ns/p2"))  # type: ignore[arg-type]
    third = tracker.add(c, "ns/p3")  # type: ignore[arg-type]
    assert first == ("ns/p1", "ns/p2") and first is second
    assert second is tracker.relays[b].pods and third == ("ns/p3",)
    tracker.abort_pod("ns/p2")
    assert (a.aborted, b.aborted, c.aborted) == (1, 1, 0)
