"""The TLS-layer benchmark: a tiny real run produces every figure, and the table takes its
ratio to uvloop within a round (speed itself is never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from nodeproxy_dev.bench.tls_layer import Measured, _summarize, _table


def test_summary_and_same_round_ratio() -> None:
    results = [
        {"role": "recv", "bytes": 10**9, "start": 100.0, "end": 102.0, "cpu_s": 0.8,
         "rss_kib": 40_000, "cipher": "TLSv1.3 TLS_AES_256_GCM_SHA384"},
        {"role": "send", "bytes": 10**9, "start": 99.9, "end": 102.1, "cpu_s": 0.6,
         "rss_kib": 39_000, "cipher": "TLSv1.3 TLS_AES_256_GCM_SHA384"},
    ]
    m = _summarize("memorybio", 1, 0, results)
    assert (m.mb_per_s, m.send_cpu_s_per_gb, m.recv_cpu_s_per_gb) == (500.0, 0.6, 0.8)
    assert m.rss_kib_per_process == 40_000
    rows = [Measured("uvloop", 1, r, mbs, 0.7, 2.0, 39_000, "c") for r, mbs in
            ((0, 100.0), (1, 400.0))]
    rows += [Measured("memorybio", 1, r, mbs, 0.6, 0.8, 39_000, "c") for r, mbs in
             ((0, 200.0), (1, 600.0))]
    line = next(x for x in _table(rows).splitlines() if x.startswith("| memorybio"))
    # Same-round ratios 2.0 and 1.5: their median, not 400 / 250.
    assert "| 1.75 |" in line


def test_tiny_run_reports_every_candidate(tmp_path: Path) -> None:
    out = tmp_path / "tls.json"
    run = subprocess.run(
        [sys.executable, "-m", "nodeproxy_dev.bench.tls_layer", "--mib", "2", "--rounds", "1",
         "--candidates", "plain,uvloop,memorybio", "--timeout", "30", "--json", str(out)],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    rows = {r["candidate"]: r for r in doc["rows"]}
    assert set(rows) == {"plain", "uvloop", "memorybio"}
    for name in ("uvloop", "memorybio"):
        assert rows[name]["cipher"].startswith("TLSv1.3 ")
        assert rows[name]["mb_per_s"] > 0 and rows[name]["recv_cpu_s_per_gb"] >= 0
    assert rows["plain"]["cipher"] == "-"
