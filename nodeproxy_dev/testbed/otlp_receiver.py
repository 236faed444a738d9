"""A small OTLP/HTTP trace receiver for the tracing tests: what a collector would get.

Run as ``python -m nodeproxy_dev.testbed.otlp_receiver --port 4318 --out FILE`` (``--host``,
default 127.0.0.1).  It accepts ``POST /v1/traces`` with an ``ExportTraceServiceRequest``
(protobuf, optionally gzip), parsed with opentelemetry-proto's classes, answers 200 with
an empty ``ExportTraceServiceResponse``, and appends one JSON line per span to FILE:
``trace_id``, ``span_id``, ``parent_span_id`` (lowercase hex, "" for none), ``name``,
``kind`` (the enum's name, "SPAN_KIND_CLIENT"), ``start_ns``, ``end_ns``,
``attributes`` and ``resource`` (key -> value), ``status`` ("STATUS_CODE_ERROR", ...),
``trace_state``.  Anything else gets 404; a body that does not parse gets 400.
Once listening it prints ``{"listening": "host:port", "ready": true}``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(values: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in values if isinstance(kv, KeyValue)}


def spans_of(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    """One dict per span of an export request (see the module docstring)."""
    out = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append({
                    "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                    "parent_span_id": span.parent_span_id.hex(), "name": span.name,
                    "kind": Span.SpanKind.Name(span.kind),
                    "start_ns": span.start_time_unix_nano,
                    "end_ns": span.end_time_unix_nano,
                    "attributes": _attributes(span.attributes), "resource": resource,
                    "status": Status.StatusCode.Name(span.status.code),
                    "trace_state": span.trace_state,
                })
    return out


def make_server(host: str, port: int, out: str) -> ThreadingHTTPServer:
    """The receiver, bound (port 0: a free one); serve_forever() runs it."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            try:
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
            except (DecodeError, OSError):
                self.send_error(400)
                return
            lines = "".join(json.dumps(s) + "\n" for s in spans_of(request))
            with lock, open(out, "a", encoding="utf-8") as f:
                f.write(lines)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *a: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def read_spans(path: str) -> list[dict[str, Any]]:
    """The spans a receiver wrote to path so far."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    server = make_server(args.host, args.port, args.out)
    print(json.dumps({"listening": f"{args.host}:{server.server_address[1]}",
                      "ready": True}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
