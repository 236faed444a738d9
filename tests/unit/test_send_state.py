"""tcp/send_state.send_state on real loopback sockets: ESTABLISHED until the peer's FIN
arrives (read or not), and the running total of bytes put into the send queue."""

from __future__ import annotations

import socket
import time

from nodeproxy.tcp.send_state import send_state, sent_total


def _pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    client = socket.create_connection(srv.getsockname())
    accepted, _ = srv.accept()
    return srv, client, accepted


def test_established_until_the_peers_fin_arrives_even_unread():
    srv, client, accepted = _pair()
    with srv, client, accepted:
        established, before = send_state(accepted)
        assert established
        accepted.sendall(b"x" * 1000)
        # Low, never high, while an ACK lands between its two reads: settled, it is exact.
        deadline = time.monotonic() + 5
        while send_state(accepted)[1] != before + 1000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert send_state(accepted) == (True, before + 1000)
        client.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while send_state(accepted)[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not send_state(accepted)[0]  # CLOSE_WAIT, the FIN not read
        assert sent_total(accepted) == before + 1000
