"""The attack client's pure parts: pacing, the slowloris byte stream, GOAWAY scanning,
status lines, summaries, and the bounds its command line enforces."""

from __future__ import annotations

import asyncio
import time

import h2.config
import h2.connection
import h2.errors
import pytest

from nodeproxy.testbed import attack


def test_start_offsets_evenly_at_the_rate_or_all_at_once() -> None:
    assert attack.start_offsets(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert attack.start_offsets(3, 0) == [0.0, 0.0, 0.0]
    assert attack.start_offsets(0, 10) == []


def test_slowloris_never_ends_the_head() -> None:
    source = attack.slowloris_bytes("10.96.0.1:80", "/x")
    sent = b"".join(next(source) for _ in range(5000))
    assert sent.startswith(b"GET /x HTTP/1.1\r\nHost: 10.96.0.1:80\r\n")
    assert b"\r\n\r\n" not in sent
    # Every header line is well formed, so the head is only ever slow, never malformed.
    lines = sent.split(b"\r\n")[1:-1]
    assert all(b": " in line for line in lines)


def test_slowloris_yields_one_byte_at_a_time() -> None:
    source = attack.slowloris_bytes("h", "/")
    assert {len(next(source)) for _ in range(200)} == {1}


def _server_bytes(last_stream: int, code: h2.errors.ErrorCodes) -> bytes:
    """A real server's bytes: its SETTINGS, then a GOAWAY, then a response frame."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    out = server.data_to_send()
    server.close_connection(error_code=code, last_stream_id=last_stream)
    out += server.data_to_send()
    return out + b"\x00\x00\x04\x01\x04\x00\x00\x00\x07" + b"\x88\x00\x00\x00"


def test_goaways_found_among_other_frames_even_split_across_reads() -> None:
    data = _server_bytes(1999, h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
    whole = bytearray(data)
    assert attack.goaways(whole) == [(0xB, 1999)]
    assert whole == b""
    buffer, found = bytearray(), []
    for i in range(0, len(data), 5):  # five bytes per read
        buffer += data[i:i + 5]
        found += attack.goaways(buffer)
    assert found == [(0xB, 1999)] and buffer == b""


def test_goaways_leave_a_partial_frame_for_later() -> None:
    data = _server_bytes(3, h2.errors.ErrorCodes.NO_ERROR)
    buffer = bytearray(data[:-2])
    assert attack.goaways(buffer) == [(0, 3)]
    assert len(buffer) == 9 + 4 - 2


def test_error_names() -> None:
    assert attack.error_name(0xB) == "ENHANCE_YOUR_CALM"
    assert attack.error_name(0) == "NO_ERROR"
    assert attack.error_name(0x999) == "2457"


def test_response_status() -> None:
    assert attack.response_status(b"HTTP/1.1 408 Request Timeout\r\n\r\n") == 408
    assert attack.response_status(b"HTTP/1.0 400 Bad\r\n") == 400
    assert attack.response_status(b"\x00\x00\x12\x04") is None
    assert attack.response_status(b"") is None


def test_summary() -> None:
    assert attack.summary([]) == {"p50": None, "max": None}
    assert attack.summary([3.0, 1.0, 2.0]) == {"p50": 2.0, "max": 3.0}
    assert attack.summary([1.0, 2.0]) == {"p50": 1.0, "max": 2.0}


def test_tally_counts_open_and_ended() -> None:
    tally = attack.Tally()
    for _ in range(3):
        tally.connected()
    tally.ended(1.5, reset=False)
    tally.ended(0.5, reset=True)
    tally.connect_errors["ConnectionRefusedError"] += 2
    report = tally.report()
    assert report["opened"] == 3 and report["most_open"] == 3
    assert report["open_at_end"] == 1
    assert report["closed_by_peer"] == 1 and report["reset_by_peer"] == 1
    assert report["connect_failed"] == 2


def test_request_headers_are_a_valid_h2_request() -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, attack.request_headers("a:80", "/p"), end_stream=True)
    client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    assert client.data_to_send()


def test_command_line_defaults_and_authority() -> None:
    plan, as_json = attack.parse(["flood", "--host", "10.0.0.1", "--port", "80", "--json"])
    assert as_json and plan.authority == "10.0.0.1:80" and plan.connections == 1
    plan, as_json = attack.parse(["rapid-reset", "--host", "fd00::1", "--port", "80"])
    assert not as_json and plan.authority == "[fd00::1]:80"


@pytest.mark.parametrize("extra", [
    ["--duration", "0"], ["--duration", "601"], ["--connections", "0"],
    ["--connections", str(attack.MAX_CONNECTIONS + 1)], ["--pairs", "0"],
    ["--rate", "-1"], ["--interval", "0"], ["--path", "x"], ["--parallel", "0"],
])
def test_command_line_refuses_unbounded_or_bad_values(extra: list[str]) -> None:
    with pytest.raises(SystemExit):
        attack.parse(["slowloris", "--host", "h", "--port", "1", *extra])


def plan(**changes: object) -> attack.Plan:
    base = attack.parse(["flood", "--host", "h", "--port", "1"])[0]
    return attack.Plan(**{**base.__dict__, **changes})


def test_workers_stop_by_themselves_even_when_every_connection_ends_at_once() -> None:
    calls: list[int] = []

    async def one(index: int, deadline: float) -> None:
        calls.append(index)  # a connection the peer refuses at once

    started = time.monotonic()
    asyncio.run(attack._paced(plan(duration=0.3, connections=3, reconnect=True), one, 0))
    assert time.monotonic() - started < 1.0
    assert set(calls) == {0, 1, 2}
    assert len(calls) <= 3 * attack.MAX_OPENS_PER_WORKER
    assert len(calls) > 3  # reconnected
    calls.clear()
    asyncio.run(attack._paced(plan(duration=0.3, connections=3, reconnect=False), one, 0))
    assert sorted(calls) == [0, 1, 2]  # one connection per slot without --reconnect


def test_workers_start_at_the_rate_and_none_after_the_deadline() -> None:
    starts: list[float] = []

    async def one(index: int, deadline: float) -> None:
        starts.append(time.monotonic())
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))

    asyncio.run(attack._paced(plan(duration=0.5, connections=100), one, 20.0))
    # 20 per second for 0.5 s: about 10 started, not 100.
    assert 8 <= len(starts) <= 11
