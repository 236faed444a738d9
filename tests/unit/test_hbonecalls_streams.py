"""hbonecalls --streams (nodeproxy_dev/bench/hbonecalls.py): every short connection's
stream through both real tunnel ends completes (the 200, both ends' bytes and
END_STREAMs), or the tool would hang, not print a figure."""

from __future__ import annotations

from nodeproxy_dev.bench import hbonecalls


def test_streams_mode_runs_every_stream_to_its_end(capsys) -> None:
    assert hbonecalls.main(["--streams", "64", "--connections", "4", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "64 streams, 4 at once" in out, out
    assert "Python calls per stream" in out, out
