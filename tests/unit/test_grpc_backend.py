"""The gRPC test backend and client (testbed/grpc_backend.py, grpc_client.py) on 127.0.0.1.

The backend runs as a subprocess; the client is used both as functions and as the CLI
the L7 tests run inside pods.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import grpc
import pytest

from nodeproxy_dev.testbed import grpc_client
from nodeproxy_dev.testbed.grpc_backend import status_code
from nodeproxy_dev.testbed.peer import Stream
from tests.unit.servers import REPO, child_env, port_of, start_tool, stop


@pytest.fixture(scope="module")
def backend() -> Iterator[SimpleNamespace]:
    proc, ready = start_tool("grpc_backend", "--host", "127.0.0.1", "--name", "g1")
    try:
        yield SimpleNamespace(target=f"127.0.0.1:{port_of(ready)}", ready=ready, proc=proc)
    finally:
        stop(proc)


def one(backend: SimpleNamespace, method: str, payload: bytes, **kw: object) -> dict:
    summary = grpc_client.run(backend.target, method, payload, **kw)  # type: ignore[arg-type]
    assert summary["count"] == kw.get("count", 1)
    return summary["calls"][0]


def texts(call: dict) -> list[str]:
    return [r.get("text") for r in call["responses"]]


def test_ready_line(backend: SimpleNamespace) -> None:
    assert backend.ready["ready"] is True
    assert backend.ready["name"] == "g1"


def test_unary_echo_and_metadata(backend: SimpleNamespace) -> None:
    payload = b"".join(Stream(b"u", 3_000_000).chunks())  # many HTTP/2 DATA frames
    call = one(backend, "Unary", payload)
    assert call["code"] == "OK"
    assert call["responses"] == [{"len": len(payload),
                                  "sha256": hashlib.sha256(payload).hexdigest()}]
    assert call["initial_metadata"]["x-backend"] == "g1"
    assert call["trailing_metadata"]["x-backend"] == "g1"
    assert texts(one(backend, "Unary", b"hello")) == ["hello"]


def test_server_stream(backend: SimpleNamespace) -> None:
    assert texts(one(backend, "ServerStream", b"3")) == ["0", "1", "2"]
    sized = one(backend, "ServerStream", b"12:7")
    assert [r["len"] for r in sized["responses"]] == [7] * 12
    assert texts(sized)[11] == "11 11 1"
    assert one(backend, "ServerStream", b"0")["responses"] == []
    started = time.monotonic()
    paced = one(backend, "ServerStream", b"3::100")
    assert time.monotonic() - started >= 0.2
    assert texts(paced) == ["0", "1", "2"]
    assert one(backend, "ServerStream", b"many")["code"] == "INVALID_ARGUMENT"


def test_client_stream(backend: SimpleNamespace) -> None:
    call = one(backend, "ClientStream", b"abcde", messages=7)
    assert (call["code"], texts(call)) == ("OK", ["35"])
    assert call["trailing_metadata"]["x-backend"] == "g1"


def test_bidi_stream(backend: SimpleNamespace) -> None:
    call = one(backend, "BidiStream", b"ping", messages=5)
    assert (call["code"], texts(call)) == ("OK", ["ping"] * 5)


@pytest.mark.parametrize("payload, code", [(b"14", "UNAVAILABLE"), (b"UNAVAILABLE", "UNAVAILABLE"),
                                           (b"8", "RESOURCE_EXHAUSTED"), (b"13", "INTERNAL"),
                                           (b"0", "OK"), (b"nonsense", "INVALID_ARGUMENT")])
def test_fail(backend: SimpleNamespace, payload: bytes, code: str) -> None:
    call = one(backend, "Fail", payload)
    assert call["code"] == code
    assert call["trailing_metadata"]["x-backend"] == "g1"
    if code not in ("OK", "INVALID_ARGUMENT"):
        attempt = call["trailing_metadata"]["x-attempt"]
        assert call["details"] == f"g1: failing with {code} (attempt {attempt})"
        assert call["initial_metadata"] == {}  # trailers-only


def test_fail_by_key_then_ok(backend: SimpleNamespace) -> None:
    summary = grpc_client.run(backend.target, "Fail", b"retry-1:2:14", count=4)
    calls = summary["calls"]
    assert [c["code"] for c in calls] == ["UNAVAILABLE", "UNAVAILABLE", "OK", "OK"]
    assert [c["trailing_metadata"]["x-attempt"] for c in calls] == ["1", "2", "3", "4"]
    assert texts(calls[2]) == ["ok"]
    assert summary["codes"] == {"UNAVAILABLE": 2, "OK": 2}
    assert summary["ok"] is False
    assert one(backend, "Fail", b"retry-2:1:UNAVAILABLE")["code"] == "UNAVAILABLE"  # own key


def test_sleep_and_deadline(backend: SimpleNamespace) -> None:
    assert one(backend, "Sleep", b"50")["code"] == "OK"
    call = one(backend, "Sleep", b"5000", timeout=0.3)
    assert call["code"] == "DEADLINE_EXCEEDED"
    assert call["latency_ms"] < 3000


def test_info_reports_metadata_and_authority(backend: SimpleNamespace) -> None:
    call = one(backend, "Info", b"", metadata=[("x-test", "one")], authority="web.example:80")
    info = json.loads(call["responses"][0]["text"])
    assert info["name"] == "g1"
    assert ["x-test", "one"] in info["metadata"]
    assert info["authority"] == "web.example:80"
    assert info["peer"].startswith("ipv4:127.0.0.1:")
    later = json.loads(one(backend, "Info", b"")["responses"][0]["text"])
    assert later["served"] > info["served"]


def test_new_channel_per_call(backend: SimpleNamespace) -> None:
    shared = grpc_client.run(backend.target, "Info", b"", count=3)
    fresh = grpc_client.run(backend.target, "Info", b"", count=3, new_channel=True)

    def peers(summary: dict) -> set[str]:
        return {json.loads(c["responses"][0]["text"])["peer"] for c in summary["calls"]}

    assert len(peers(shared)) == 1
    assert len(peers(fresh)) == 3


def test_status_code_names_and_numbers() -> None:
    assert status_code("14") is grpc.StatusCode.UNAVAILABLE
    assert status_code("deadline_exceeded") is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(ValueError):
        status_code("99")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nodeproxy_dev.testbed.grpc_client", *args],
                          capture_output=True, text=True, timeout=60, env=child_env(), cwd=REPO)


def test_cli_json(backend: SimpleNamespace) -> None:
    result = cli("--target", backend.target, "--method", "Unary", "--payload", "X",
                 "--count", "3", "--metadata", "k=v", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ok"] is True
    assert summary["codes"] == {"OK": 3}
    assert summary["method"] == "Unary" and summary["target"] == backend.target
    assert set(summary["latency_ms"]) == {"p50", "p90", "p99", "max"}
    assert [texts(c) for c in summary["calls"]] == [["X"]] * 3

    result = cli("--target", backend.target, "--method", "ClientStream", "--payload-size",
                 "100000", "--messages", "3", "--json")
    assert json.loads(result.stdout)["calls"][0]["responses"][0]["text"] == "300000"

    failed = cli("--target", backend.target, "--method", "Fail", "--payload", "14", "--json")
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["codes"] == {"UNAVAILABLE": 1}


def test_cli_unreachable_target() -> None:
    result = cli("--target", "127.0.0.1:1", "--method", "Unary", "--timeout", "2", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["calls"][0]["code"] == "UNAVAILABLE"


def test_dual_stack_by_default() -> None:
    proc, ready = start_tool("grpc_backend", "--name", "dual")
    try:
        for host in ("127.0.0.1", "[::1]"):
            call = grpc_client.run(f"{host}:{port_of(ready)}", "Unary", b"x")["calls"][0]
            assert call["trailing_metadata"]["x-backend"] == "dual"
    finally:
        stop(proc)
    assert proc.returncode == 0
