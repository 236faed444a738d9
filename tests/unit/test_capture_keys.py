"""The packed map keys of capture/contract.py (dial_key, msg_key, packed_address) equal the
same keys filled field by field, the way the kernel's structs are laid out: addresses as
network-order bytes in u32 words, IPv4 in the first word, the dial's remote port in
network order."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from nodeproxy.capture import contract


def _words(text: str) -> list[int]:
    raw = ipaddress.ip_address(text).packed
    return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]


def _fill(field, text: str) -> None:
    for i, word in enumerate(_words(text)):
        field[i] = word


CASES = [
    (socket.AF_INET, "10.1.2.3", 45123, "10.1.9.8", 7000),
    (socket.AF_INET, "255.255.255.255", 65535, "0.0.0.1", 1),
    (socket.AF_INET6, "fd00:99::7", 32768, "fd00:1::abcd", 80),
    (socket.AF_INET6, "::ffff:10.1.2.3", 1, "::ffff:10.1.9.8", 65535),
]


@pytest.mark.parametrize(("family", "remote", "rport", "local", "lport"), CASES)
def test_dial_key_matches_the_field_by_field_struct(family, remote, rport, local, lport):
    expected = contract.CDialKey()
    _fill(expected.remote_ip, remote)
    _fill(expected.local_ip, local)
    expected.remote_port = socket.htons(rport)
    expected.family = family
    expected.local_port = lport
    key = contract.dial_key(family, contract.packed_address(family, remote), rport,
                            contract.packed_address(family, local), lport)
    assert bytes(key) == bytes(expected)
    assert bytes(key)[32:34] == rport.to_bytes(2, "big")  # network order, as sk_lookup


@pytest.mark.parametrize(("family", "remote", "rport", "local", "lport"), CASES)
def test_msg_key_matches_the_field_by_field_struct(family, remote, rport, local, lport):
    cookie = 0x1234_5678_9ABC_DEF0
    expected = contract.CMsgKey()
    expected.netns_cookie = cookie
    expected.family = family
    expected.local_port = lport
    expected.remote_port = rport
    _fill(expected.local_ip, local)
    _fill(expected.remote_ip, remote)
    key = contract.msg_key(cookie, family, contract.packed_address(family, local), lport,
                           contract.packed_address(family, remote), rport)
    assert bytes(key) == bytes(expected)


def test_packed_address_is_the_kernel_form_and_refuses_garbage():
    assert contract.packed_address(socket.AF_INET, "10.0.0.1") == bytes([10, 0, 0, 1])
    assert contract.packed_address(socket.AF_INET6, "fe80::1%eth0") == \
        ipaddress.ip_address("fe80::1").packed
    for family, text in ((socket.AF_INET, "10.0.0.256"), (socket.AF_INET, "::1"),
                         (socket.AF_INET6, "not-an-address")):
        with pytest.raises(OSError):
            contract.packed_address(family, text)


def test_a_packed_key_of_the_wrong_size_never_reaches_the_kernel():
    from nodeproxy.capture.map_access import BpfMap

    dials = BpfMap(contract.PROXY_DIALS, -1)  # no map: the check comes before any call
    key = contract.dial_key(socket.AF_INET, bytes(4), 1, bytes(4), 2)
    assert len(key) == contract.ctypes.sizeof(contract.CDialKey)
    assert dials._key_ref(key) is key
    for wrong in (key[:-1], key + b"\0", b""):
        with pytest.raises(ValueError, match="proxy_dials"):
            dials.put(wrong, 1)
        with pytest.raises(ValueError):
            dials.delete(wrong)
