"""The L7 profiling harness's summary of py-spy's collapsed stacks (a pure function)."""

from __future__ import annotations

from pathlib import Path

from nodeproxy_dev.bench.l7profile import summarize


def test_self_and_inclusive_shares_add_up_per_function(tmp_path: Path) -> None:
    raw = tmp_path / "x.raw"
    raw.write_text(
        "run (runners.py:118);handle (/x/nodeproxy/http/handler.py:90);"
        "write (/x/nodeproxy/codec/h1.py:614) 30\n"
        "run (runners.py:118);handle (/x/nodeproxy/http/handler.py:91) 10\n"
        "run (runners.py:118) 60\n")
    text = summarize(str(raw))
    assert text.startswith("samples: 100\n")
    own, inclusive = text.split("inclusive:")
    assert " 60.0%  run (runners.py)" in own and " 30.0%  write (h1.py)" in own
    assert " 10.0%  handle (handler.py)" in own  # two lines of one function: one row
    assert "100.0%  run (runners.py)" in inclusive
    assert " 40.0%  handle (handler.py)" in inclusive
