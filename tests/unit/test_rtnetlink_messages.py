"""nodeproxy.capture.rtnetlink's message layout and its reading of the kernel's answers,
without root (the kernel's side is tests/integration/test_transparent_routes.py)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from nodeproxy.capture import rtnetlink


def answer(seq: int, error: int) -> bytes:
    """An NLMSG_ERROR as the kernel sends it: its header, the error, the request's header."""
    body = struct.pack("=i", error) + struct.pack("=IHHII", 16, 0, 0, seq, 0)
    return struct.pack("=IHHII", 16 + len(body), rtnetlink.NLMSG_ERROR, 0, seq, 1) + body


def test_the_answer_to_our_request_is_found_among_others() -> None:
    assert rtnetlink.acknowledgement(answer(3, 0), 3) == 0
    assert rtnetlink.acknowledgement(answer(2, -errno.EEXIST) + answer(3, -errno.ENOENT),
                                     3) == errno.ENOENT
    with pytest.raises(ValueError):
        rtnetlink.acknowledgement(answer(2, 0), 3)
    with pytest.raises(ValueError):  # truncated, or a header claiming less than itself
        rtnetlink.acknowledgement(answer(3, 0)[:10], 3)
    with pytest.raises(ValueError):
        rtnetlink.acknowledgement(struct.pack("=IHHII", 4, rtnetlink.NLMSG_ERROR, 0, 3, 0), 3)


def test_a_rule_request_is_what_ip_rule_sends() -> None:
    msg = rtnetlink.rule_message(True, socket.AF_INET6, 0x4E51, 15051, 15051, seq=7)
    length, kind, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq) == (len(msg), rtnetlink.RTM_NEWRULE, 7)
    assert flags == (rtnetlink.NLM_F_REQUEST | rtnetlink.NLM_F_ACK | rtnetlink.NLM_F_CREATE
                     | rtnetlink.NLM_F_EXCL)
    family, _, _, _, table, _, _, action, _ = struct.unpack_from("=BBBBBBBBI", msg, 16)
    assert (family, table, action) == (socket.AF_INET6, 0, rtnetlink.FR_ACT_TO_TBL)
    attrs = {kind: value for _, kind, value in struct.iter_unpack("=HHI", msg[28:])}
    assert attrs == {rtnetlink.FRA_PRIORITY: 15051, rtnetlink.FRA_FWMARK: 0x4E51,
                     rtnetlink.FRA_TABLE: 15051}
    delete = rtnetlink.rule_message(False, socket.AF_INET, 0x4E51, 100, 9)
    assert struct.unpack_from("=IHH", delete)[1:] == (
        rtnetlink.RTM_DELRULE, rtnetlink.NLM_F_REQUEST | rtnetlink.NLM_F_ACK)
    assert struct.unpack_from("=BBBBB", delete, 16)[4] == 100  # a small table in the header too


def test_a_route_request_is_local_default_in_the_table() -> None:
    msg = rtnetlink.local_default_route_message(True, socket.AF_INET, 15051, 1)
    family, dst_len, _, _, table, protocol, scope, kind, _ = struct.unpack_from(
        "=BBBBBBBBI", msg, 16)
    assert (family, dst_len, table, scope, kind) == (
        socket.AF_INET, 0, 0, rtnetlink.RT_SCOPE_HOST, rtnetlink.RTN_LOCAL)
    assert protocol == 3  # boot, as ip route add
    attrs = {kind: value for _, kind, value in struct.iter_unpack("=HHI", msg[28:])}
    assert attrs == {rtnetlink.RTA_TABLE: 15051, rtnetlink.RTA_OIF: 1}
    delete = rtnetlink.local_default_route_message(False, socket.AF_INET, 15051, 1)
    assert struct.unpack_from("=BBBBBBBBI", delete, 16)[5] == 0  # any protocol matches
