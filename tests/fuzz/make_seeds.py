"""Write the binary seeds of the HTTP/2 and HBONE targets (what real clients send), so the
corpus in tests/fuzz/corpus can be rebuilt and reviewed: ``python -m tests.fuzz.make_seeds``.

The h2 library plays the client: each seed is the bytes it writes for one scenario.  The
text seeds (HTTP/1.1 requests, YAML, CNI JSON, policies) are kept as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.settings

from nodeproxy.codec import h2_frames

CORPUS = Path(__file__).parent / "corpus"
Client = h2.connection.H2Connection


def _client() -> Client:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def _request(conn: Client, sid: int, path: str = "/", method: str = "GET",
             extra: list[tuple[str, str]] | None = None, end: bool = True) -> None:
    conn.send_headers(sid, [(":method", method), (":scheme", "http"),
                            (":authority", "web.shop.svc:8080"), (":path", path),
                            ("user-agent", "h2-seed"), *(extra or [])], end_stream=end)


def h2_seeds() -> dict[str, Callable[[Client], None]]:
    def get(c: Client) -> None:
        _request(c, 1)

    def post(c: Client) -> None:
        _request(c, 1, "/api/items", "POST", [("content-type", "application/json"),
                                              ("content-length", "13")], end=False)
        c.send_data(1, b'{"name":"a"}\n', end_stream=True)

    def grpc_trailers(c: Client) -> None:
        _request(c, 1, "/pkg.Svc/Call", "POST", [("content-type", "application/grpc"),
                                                 ("te", "trailers")], end=False)
        c.send_data(1, b"\x00\x00\x00\x00\x02hi")
        c.send_headers(1, [("grpc-timeout", "1S")], end_stream=True)

    def many_streams(c: Client) -> None:
        for sid in (1, 3, 5):
            _request(c, sid, f"/s{sid}?q={sid}")

    def rapid_reset(c: Client) -> None:
        for sid in range(1, 41, 2):
            _request(c, sid, "/slow", end=False)
            c.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)

    def control(c: Client) -> None:
        c.ping(b"12345678")
        c.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        c.increment_flow_control_window(1 << 20)
        _request(c, 1, "/after-control")
        c.close_connection()

    def continuation(c: Client) -> None:
        c.max_outbound_frame_size = 16384
        _request(c, 1, "/big-head", extra=[(f"x-h{i}", "v" * 200) for i in range(120)])

    def expect_continue(c: Client) -> None:
        _request(c, 1, "/upload", "PUT", [("expect", "100-continue")], end=False)
        c.send_data(1, b"abc", end_stream=True)

    def connect(c: Client) -> None:
        c.send_headers(1, [(":method", "CONNECT"), (":authority", "db:5432")], end_stream=False)
        c.send_data(1, b"raw bytes")

    def tricky_path(c: Client) -> None:
        _request(c, 1, "/public/..%2fadmin", extra=[("x-token", "a"), ("x-token", "b")])
        _request(c, 3, "/public//../admin;x")

    return {name: fn for name, fn in locals().items() if callable(fn)}


def hbone_seeds() -> dict[str, Callable[[Client], None]]:
    def _connect(c: Client, sid: int, authority: str, extra: list[tuple[str, str]]) -> None:
        c.send_headers(sid, [(":method", "CONNECT"), (":authority", authority), *extra],
                       end_stream=False)

    def connect(c: Client) -> None:
        _connect(c, 1, "10.244.2.20:8080", [("forwarded", "for=10.244.1.10")])
        c.send_data(1, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")

    def connect_marked(c: Client) -> None:
        _connect(c, 1, "10.244.2.20:8080", [("forwarded", "for=10.244.1.10"),
                                            ("x-nodeproxy-l7-authorized", "1")])
        _connect(c, 3, "[fd00::20]:443", [("forwarded", 'for="[fd00::10]"')])

    def wrong_pod(c: Client) -> None:
        _connect(c, 1, "10.244.9.9:8080", [])
        _connect(c, 3, "10.244.2.20", [])
        c.send_headers(5, [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                           (":authority", "10.244.2.20:80")], end_stream=True)

    def reset_and_ping(c: Client) -> None:
        _connect(c, 1, "10.244.2.20:8080", [])
        c.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
        c.ping(b"abcdefgh")
        c.increment_flow_control_window(1000)
        c.close_connection()

    def end_stream(c: Client) -> None:
        # How streams end (the session's END_STREAM shortcut, h2_connection.py): after
        # data, then what a correct client never sends (END_STREAM twice, DATA after it,
        # END_STREAM on a stream never opened), and with a declared length.
        _connect(c, 1, "10.244.2.20:8080", [("forwarded", "for=10.244.1.10")])
        c.send_data(1, b"abc", end_stream=True)
        _connect(c, 5, "10.244.2.20:8080", [])
        c.end_stream(5)
        c._data_to_send += (h2_frames.empty_data(5, True) + h2_frames.data_header(1, 1) + b"x"
                            + h2_frames.empty_data(99, True))
        _connect(c, 7, "10.244.2.20:8080", [("content-length", "3")])
        c.send_data(7, b"abc", end_stream=True)

    def static_blocks(c: Client) -> None:
        # CONNECTs whose blocks leave HPACK's dynamic table alone, as nodeproxy's source
        # nodes send them (tunnel/header_block.py): the destination takes them without
        # h2's decoder (h2_connection.py receive_known_request).  Repeated on new
        # streams, between h2's indexed blocks, then with a field h2's checks refuse.
        import ipaddress

        from nodeproxy.tunnel.header_block import connect_block, literal, source_port_field

        block, _ = connect_block(ipaddress.ip_address("10.244.2.20"), 8080,
                                 ipaddress.ip_address("10.244.1.10"), False)

        def static(sid: int, extra: bytes = b"") -> None:
            whole = block + source_port_field(40000 + sid) + extra
            c._data_to_send += h2_frames.header(len(whole), h2_frames.HEADERS,
                                                h2_frames.END_HEADERS, sid) + whole
            c.highest_outbound_stream_id = sid

        static(1)
        c._data_to_send += h2_frames.data_header(3, 1) + b"abc" + h2_frames.empty_data(1, True)
        _connect(c, 3, "10.244.2.20:8080", [("forwarded", "for=10.244.1.10")])
        static(5)
        static(7, b"\xbe")  # a dynamic-table reference after static fields: h2's
        static(9, literal("x-bad", "a\rb"))

    return {name: fn for name, fn in locals().items() if callable(fn) and name[0] != "_"}


def main() -> None:
    for target, seeds in (("fuzz_h2_server", h2_seeds()), ("fuzz_hbone_server", hbone_seeds())):
        directory = CORPUS / target
        directory.mkdir(parents=True, exist_ok=True)
        for name, scenario in seeds.items():
            conn = _client()
            scenario(conn)
            (directory / name).write_bytes(conn.data_to_send())


if __name__ == "__main__":
    main()
