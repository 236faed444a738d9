"""A finished HBONE stream is freed by reference counting alone: its StreamTransport and
the protocol on it (a relay's side in the daemon) hold each other while the stream is
open, and must let go when it ends, or every cross-node connection is a cycle left to
the cyclic collector (4-5 objects per connection in a daemon under the bench's
cross-node connect load, docs/benchmarks.md "The heap after a busy period").  Both real
tunnel ends over the mesh's TLS, through hbonecalls' short streams."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest

from nodeproxy.tunnel import session
from nodeproxy_dev.bench import hbonecalls


def test_finished_streams_and_their_protocols_are_freed_without_the_collector(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    made: list[weakref.ref[Any]] = []
    original = session.StreamTransport.__init__

    def recording(self: Any, *args: Any) -> None:
        original(self, *args)
        made.append(weakref.ref(self))
    monkeypatch.setattr(session.StreamTransport, "__init__", recording)
    gc.collect()
    gc.disable()
    try:
        assert hbonecalls.main(["--streams", "64", "--connections", "4"]) == 0
        alive = [ref() for ref in made if ref() is not None]
    finally:
        gc.enable()
    assert "64 streams, 4 at once" in capsys.readouterr().out
    assert len(made) >= 2 * 64  # both ends' transports of every stream
    assert alive == []
