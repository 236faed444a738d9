"""The connection profile's reading of py-spy's folded stacks (nodeproxy_dev.bench.connprofile)."""

from __future__ import annotations

import pytest

from nodeproxy_dev.bench.profile_reading import folded_shares

FOLDED = "\n".join([
    "<module> (nodeproxy/__main__.py:3);run (uvloop/__init__.py:105);"
    "_serve (nodeproxy/listeners/outbound.py:130);dial_transparent (nodeproxy/tcp/dial.py:90) 30",
    "<module> (nodeproxy/__main__.py:3);run (uvloop/__init__.py:105);"
    "_serve (nodeproxy/listeners/outbound.py:141) 10",
    "<module> (nodeproxy/__main__.py:3);run (uvloop/__init__.py:105);"
    "forward (nodeproxy/tcp/relay.py:200);forward (nodeproxy/tcp/relay.py:210) 60",
    "garbage line",
])


def test_inclusive_shares_count_a_function_once_per_stack_whatever_the_line():
    shares = folded_shares(FOLDED, expected=200)
    assert shares["samples"] == 100 and shares["busy_share"] == pytest.approx(0.5)
    top = dict(shares["top"])
    assert top["run (uvloop/__init__.py)"] == pytest.approx(1.0)
    assert top["_serve (nodeproxy/listeners/outbound.py)"] == pytest.approx(0.4)
    assert top["forward (nodeproxy/tcp/relay.py)"] == pytest.approx(0.6)  # not 1.2
    assert top["dial_transparent (nodeproxy/tcp/dial.py)"] == pytest.approx(0.3)


def test_no_samples_is_an_idle_process_not_an_error():
    assert folded_shares("", expected=1600) == {"samples": 0, "busy_share": 0.0, "top": []}


def test_nstat_counters_are_read_by_name_and_differenced() -> None:
    from nodeproxy_dev.bench.connprofile import _nstat_delta, parse_nstat

    before = parse_nstat("#kernel\nTcpActiveOpens                  10                 0.0\n"
                         "TcpExtListenOverflows           2                  0.0\n"
                         "TcpExtSomethingElse             99                 0.0\n")
    after = parse_nstat("#kernel\nTcpActiveOpens                  8998               0.0\n"
                        "TcpExtListenOverflows           5                  0.0\n"
                        "TcpExtTCPSynRetrans             1                  0.0\n")
    assert "TcpExtSomethingElse" not in before
    delta = _nstat_delta(before, after)
    assert delta["TcpActiveOpens"] == 8988
    assert delta["TcpExtListenOverflows"] == 3
    assert delta["TcpExtTCPSynRetrans"] == 1  # absent before: counted from 0
    assert delta["TcpExtListenDrops"] == 0  # absent from both
