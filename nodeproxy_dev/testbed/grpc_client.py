"""gRPC test client for the L7 tests: calls ``test.Echo`` (see grpc_backend) and reports.

Run inside pods as::

    python -m nodeproxy_dev.testbed.grpc_client --target HOST:PORT --method Unary \\
        --payload X [--count N] [--messages K] [--metadata k=v ...] [--timeout S] \\
        [--authority NAME] [--new-channel] --json

It makes N calls one after the other, on one channel (one HTTP/2 connection) unless
``--new-channel`` (one each: gRPC's sharing of connections between the channels of a
process is off); ClientStream and BidiStream send the payload K times.  With
``--json`` it prints one JSON line: ``{ok, target, method, count, codes: {name: n},
latency_ms: {p50, p90, p99, max}, calls: [...]}``, each call being ``{code, details,
initial_metadata, trailing_metadata, responses: [{len, sha256, text?}], latency_ms}``
(``text``: the payload when it is short UTF-8).  Exit status 0 when every call ended
OK.  The client's own retries and any HTTP proxy from the environment are off, so
what is seen is what the path under test did.

The functions (``channel``, ``call``, ``run``) serve tests that call from this process.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

from nodeproxy_dev.testbed.peer import Stream, emit, percentiles

SERVICE = "test.Echo"
KINDS = {
    "Unary": "unary_unary",
    "ServerStream": "unary_stream",
    "ClientStream": "stream_unary",
    "BidiStream": "stream_stream",
    "Fail": "unary_unary",
    "Sleep": "unary_unary",
    "Info": "unary_unary",
}
TEXT_LIMIT = 256


def channel(target: str, authority: str | None = None) -> grpc.Channel:
    """An insecure channel with a connection of its own, without client retries or
    environment proxies."""
    options: list[tuple[str, Any]] = [
        ("grpc.enable_retries", 0),
        ("grpc.enable_http_proxy", 0),
        # Its own connection: channels of a process otherwise share one per target.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    if authority:
        options.append(("grpc.default_authority", authority))
    return grpc.insecure_channel(target, options=options)


def _metadata(items: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or ():
        key, value = item[0], item[1]
        text = value if isinstance(value, str) else bytes(value).hex()
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def _payload_info(data: bytes) -> dict[str, Any]:
    info: dict[str, Any] = {"len": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if len(data) <= TEXT_LIMIT:
        try:
            info["text"] = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return info


def call(chan: grpc.Channel, method: str, payload: bytes, *, messages: int = 1,
         metadata: Sequence[tuple[str, str]] = (), timeout: float | None = 10.0
         ) -> dict[str, Any]:
    """One call of test.Echo/<method>: its status, metadata, responses and latency."""
    kind = KINDS[method]
    path = f"/{SERVICE}/{method}"
    responses: list[bytes] = []
    result: dict[str, Any] = {}
    md = tuple(metadata) or None

    def requests() -> Iterator[bytes]:
        for _ in range(messages):
            yield payload

    started = time.perf_counter()
    state: Any = None
    try:
        if kind == "unary_unary":
            response, state = chan.unary_unary(path).with_call(payload, timeout=timeout,
                                                               metadata=md)
            responses.append(response)
        elif kind == "stream_unary":
            response, state = chan.stream_unary(path).with_call(requests(), timeout=timeout,
                                                                metadata=md)
            responses.append(response)
        else:
            if kind == "unary_stream":
                state = chan.unary_stream(path)(payload, timeout=timeout, metadata=md)
            else:
                state = chan.stream_stream(path)(requests(), timeout=timeout, metadata=md)
            for response in state:
                responses.append(response)
    except grpc.RpcError as e:
        state = e
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
    code = state.code() if state is not None else grpc.StatusCode.UNKNOWN
    result["code"] = code.name
    result["details"] = state.details() if state is not None else None
    result["initial_metadata"] = _metadata(state.initial_metadata() if state else ())
    result["trailing_metadata"] = _metadata(state.trailing_metadata() if state else ())
    result["responses"] = [_payload_info(r) for r in responses]
    return result


def run(target: str, method: str, payload: bytes, *, count: int = 1, messages: int = 1,
        metadata: Sequence[tuple[str, str]] = (), timeout: float | None = 10.0,
        authority: str | None = None, new_channel: bool = False) -> dict[str, Any]:
    """count calls one after the other; the summary the CLI prints."""
    if method not in KINDS:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(KINDS)})")
    calls: list[dict[str, Any]] = []
    chan: grpc.Channel | None = None
    try:
        for _ in range(count):
            if chan is None or new_channel:
                if chan is not None:
                    chan.close()
                chan = channel(target, authority)
            calls.append(call(chan, method, payload, messages=messages, metadata=metadata,
                              timeout=timeout))
    finally:
        if chan is not None:
            chan.close()
    latencies = [c["latency_ms"] for c in calls]
    p = percentiles(latencies)
    codes = Counter(c["code"] for c in calls)
    return {
        "ok": bool(calls) and codes["OK"] == len(calls),
        "target": target,
        "method": method,
        "count": len(calls),
        "codes": dict(codes),
        "latency_ms": {"p50": p[50], "p90": p[90], "p99": p[99],
                       "max": max(latencies) if latencies else 0.0},
        "calls": calls,
    }


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip().lower(), value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nodeproxy_dev.testbed.grpc_client",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT or [IPv6]:PORT")
    parser.add_argument("--method", required=True, choices=sorted(KINDS))
    payload = parser.add_mutually_exclusive_group()
    payload.add_argument("--payload", default="", help="request payload (UTF-8 text)")
    payload.add_argument("--payload-size", type=int, default=None,
                         help="instead: this many bytes of a deterministic stream")
    parser.add_argument("--count", type=int, default=1, help="calls, one after the other")
    parser.add_argument("--messages", type=int, default=1,
                        help="ClientStream/BidiStream: request messages per call")
    parser.add_argument("--metadata", type=_pair, action="append", default=[],
                        help="KEY=VALUE request metadata (repeatable)")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline per call (s)")
    parser.add_argument("--authority", default=None, help=":authority to send")
    parser.add_argument("--new-channel", action="store_true",
                        help="a new channel (connection) for every call")
    parser.add_argument("--json", action="store_true", help="print the JSON summary")
    args = parser.parse_args(argv)
    data = (b"".join(Stream(b"grpc", args.payload_size).chunks())
            if args.payload_size is not None else args.payload.encode())
    summary = run(args.target, args.method, data, count=args.count, messages=args.messages,
                  metadata=args.metadata, timeout=args.timeout, authority=args.authority,
                  new_channel=args.new_channel)
    if args.json:
        emit(summary)
    else:
        for c in summary["calls"]:
            print(f"{c['code']} {c['latency_ms']} ms {len(c['responses'])} responses"
                  + (f": {c['details']}" if c["details"] else ""))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
