"""The tracker shares one tuple of pod keys between connections of the same pods
(tcp/tracker.py): what it records per connection is unchanged (a vanished pod's
connections are still found and only they are reset), and a pod that makes connections
towards ever new keys cannot grow the shared set past its bound."""

from __future__ import annotations

from nodeproxy.tcp import tracker as tracker_module
from nodeproxy.tcp.tracker import ConnectionTracker


class _Relay:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


def test_connections_between_the_same_pods_share_their_keys_and_abort_pod_still_finds_them():
    tracker = ConnectionTracker()
    a, b, c = _Relay(), _Relay(), _Relay()
    tracker.add(a, "ns/p1", "ns/p2")  # type: ignore[arg-type]
    shared = tracker.add(b, *("ns/p1", "ns/p2"))  # type: ignore[arg-type]
    tracker.add(c, "ns/p3")  # type: ignore[arg-type]
    assert tracker.relays[a] == ("ns/p1", "ns/p2") and tracker.relays[a] is tracker.relays[b]
    assert shared is tracker.relays[b]
    assert tracker.relays[c] == ("ns/p3",)
    tracker.abort_pod("ns/p2")
    assert (a.aborted, b.aborted, c.aborted) == (1, 1, 0)
    tracker.discard(a)  # type: ignore[arg-type]
    assert tracker.relays[b] == ("ns/p1", "ns/p2") and a not in tracker.relays


def test_ever_new_keys_keep_the_shared_set_bounded_and_every_connection_its_own_keys():
    tracker = ConnectionTracker()
    relays = []
    for i in range(3 * tracker_module._PODS_CACHE + 5):
        relay = _Relay()
        tracker.add(relay, "ns/src", f"ns/dst-{i}")  # type: ignore[arg-type]
        relays.append(relay)
        assert len(tracker._pods) <= tracker_module._PODS_CACHE
    assert all(tracker.relays[r] == ("ns/src", f"ns/dst-{i}") for i, r in enumerate(relays))
    tracker.abort_pod("ns/dst-7")
    assert [r.aborted for r in relays[:9]] == [0] * 7 + [1, 0]
