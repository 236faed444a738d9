"""The attack client's pure parts: pacing, the slowloris byte stream, the HTTP/2 units,
GOAWAY scanning, status lines, summaries, and the bounds its command line enforces; and a
flood's held phase against a loopback server."""

from __future__ import annotations

import asyncio
import json
import time

import h2.config
import h2.connection
import h2.errors
import pytest

from nodeproxy_dev.testbed import attack


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


def test_slowloris_head_at_once_then_one_byte_at_a_time() -> None:
    source = attack.slowloris_bytes("h", "/p", head_at_once=True)
    assert next(source) == b"GET /p HTTP/1.1\r\nHost: h\r\n"
    assert {len(next(source)) for _ in range(200)} == {1}


@pytest.mark.parametrize("kind, frame_type, opens_stream", [
    ("rapid-reset", 0x1, True), ("ping-flood", 0x6, False),
    ("settings-flood", 0x4, False), ("window-update-flood", 0x8, False)])
def test_each_http2_kind_sends_its_own_frame(kind: str, frame_type: int,
                                             opens_stream: bool) -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.data_to_send()
    attack.send_unit(kind, client, 7, attack.request_headers("a:80", "/"))
    data = client.data_to_send()
    assert data[3] == frame_type
    assert (int.from_bytes(data[5:9], "big") == 1) == opens_stream
    if kind == "rapid-reset":  # HEADERS, then RST_STREAM(CANCEL) on the same stream
        second = data[9 + int.from_bytes(data[0:3], "big"):]
        assert second[3] == 0x3 and second[5:9] == data[5:9] and second[9:13] == b"\0\0\0\x08"
    with pytest.raises(ValueError):
        attack.send_unit("flood", client, 0, [])


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
    conns = [tally.connected() for _ in range(3)]
    tally.ended(conns[0], reset=False)
    tally.ended(conns[1], reset=True)
    tally.connect_errors["ConnectionRefusedError"] += 2
    report = tally.report()
    assert report["opened"] == 3 and report["most_open"] == 3
    assert report["open_at_end"] == 1
    assert report["closed_by_peer"] == 1 and report["reset_by_peer"] == 1
    assert report["connect_failed"] == 2
    assert "per_connection" not in report and tally.connections == []


def test_tally_keeps_each_connection_and_its_first_answer() -> None:
    tally = attack.Tally(keep=True)
    first, second = tally.connected(), tally.connected()
    tally.answered(first, b"HTTP/1.1 503 Service Unavailable\r\n")
    tally.answered(first, b"x" * 100)  # the rest: kept up to ANSWER_BYTES, not counted
    tally.ended(first, reset=False)
    report = tally.report()
    assert report["statuses"] == {"503": 1} and report["responses"] == 1
    one, two = report["per_connection"]
    assert one["answer"].startswith("HTTP/1.1 503 ") and len(one["answer"]) == 64
    assert one["ended_after"] is not None and not one["reset"]
    assert two == {"ended_after": None, "reset": False, "answer": ""}
    assert second.ended_after is None


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
    plan = attack.parse(["flood", "--host", "h", "--port", "1", "--send-hex", "474554",
                         "--settle", "1.5"])[0]
    assert plan.send == b"GET" and plan.settle == 1.5


@pytest.mark.parametrize("extra", [
    ["--duration", "0"], ["--duration", "601"], ["--connections", "0"],
    ["--connections", str(attack.MAX_CONNECTIONS + 1)], ["--count", "0"],
    ["--rate", "-1"], ["--interval", "0"], ["--path", "x"], ["--parallel", "0"],
    ["--batch", "0"], ["--pause", "-1"], ["--send-hex", "zz"], ["--settle", "10"],
    ["--send-hex", "00" * 65537],
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


def test_flood_reports_held_then_holds_until_released(capsys: pytest.CaptureFixture[str],
                                                      ) -> None:
    """A loopback server answers the first two connections 503 and closes them, keeps
    the others: the held report says so per connection; the rest stay open until the
    run is released (here: stdin is no pipe, so until --duration)."""
    served: list[bytes] = []

    async def main() -> dict[str, object]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            served.append(await reader.readexactly(3))
            if len(served) <= 2:
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
                writer.close()
                return
            await reader.read()  # until the client goes
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        plan = attack.parse(["flood", "--host", "127.0.0.1", "--port", str(port),
                             "--connections", "5", "--parallel", "1", "--send-hex",
                             b"GET".hex(), "--settle", "0.3", "--duration", "1.5",
                             "--per-connection"])[0]
        async with server:
            return await attack.flood(plan)

    started = time.monotonic()
    done = asyncio.run(main())
    held = json.loads(capsys.readouterr().out.splitlines()[0])
    assert served == [b"GET"] * 5  # --send-hex went out on every connection
    assert held["phase"] == "held" and held["opened"] == 5
    assert held["closed_by_peer"] == 2 and held["open_at_end"] == 3
    answers = [c["answer"] for c in held["per_connection"]]
    assert sum(a.startswith("HTTP/1.1 503") for a in answers) == 2 and answers.count("") == 3
    assert done["phase"] == "done" and done["open_at_end"] == 3
    assert time.monotonic() - started >= 1.4  # held until the duration


