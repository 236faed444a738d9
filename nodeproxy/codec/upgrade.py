"""Which protocol switches the proxy lets a client make, and whether an upstream's 101
completes the one offered: pure decisions that http/upgrade_flow.py acts on.

An HTTP/1.1 request with ``Connection: upgrade`` offers the protocols in its ``Upgrade``
header.  As Envoy does, only configured upgrade types pass (``http.allowedUpgrades``,
``websocket`` by default), compared case-insensitively with the whole offer, which must be
one token.  ``h2c`` is never an upgrade through the proxy: the request is served as an
ordinary HTTP/1.1 request without its Upgrade and HTTP2-Settings headers (Envoy strips
them the same way), since a backend speaking HTTP/2 on the client's connection would carry
requests the proxy never sees.  CONNECT (HTTP/1.1, HTTP/2 and HTTP/2 extended CONNECT) is
refused: the proxy has no CONNECT support to configure.

A refused upgrade or CONNECT is answered 403 (Envoy's ``upgrade_failed``) and counted in
``nodeproxy_http_upgrade_refusals_total{reason}`` with one of REASONS.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum

H2C = "h2c"

# Reasons of nodeproxy_http_upgrade_refusals_total, each documented in docs/http.md.
CONNECT = "connect"  # HTTP/1.1 or HTTP/2 CONNECT
EXTENDED_CONNECT = "extended_connect"  # HTTP/2 CONNECT with :protocol (RFC 8441)
NOT_ALLOWED = "not_allowed"  # an Upgrade token not in http.allowedUpgrades
SEVERAL_TOKENS = "several_tokens"  # an Upgrade header offering more than one protocol
EMPTY = "empty"  # Connection: upgrade with an empty Upgrade header
WITH_BODY = "with_body"  # an upgrade request carrying a body
H2C_STRIPPED = "h2c_stripped"  # Upgrade: h2c removed; served as an ordinary request
NOT_SWITCHED = "not_switched"  # the upstream answered the offer with a non-101 response
UNEXPECTED_101 = "unexpected_101"  # a 101 to a request that offered no upgrade (502)
WRONG_PROTOCOL = "wrong_protocol"  # a 101 naming another protocol than the offer (502)
REASONS = (CONNECT, EXTENDED_CONNECT, NOT_ALLOWED, SEVERAL_TOKENS, EMPTY, WITH_BODY,
           H2C_STRIPPED, NOT_SWITCHED, UNEXPECTED_101, WRONG_PROTOCOL)


class Verdict(Enum):
    PLAIN = "plain"  # serve as an ordinary request (no upgrade, or h2c stripped)
    UPGRADE = "upgrade"  # forward the offer; relay bytes only after a matching 101
    REFUSE = "refuse"  # answer 403


@dataclass(frozen=True)
class UpgradeDecision:
    verdict: Verdict
    token: str = ""  # UPGRADE: the token to offer upstream
    reason: str = ""  # REFUSE (and h2c PLAIN): the counter's reason


def tokens(value: str) -> list[str]:
    """The protocols an Upgrade header value lists (RFC 9110 7.8), blanks dropped."""
    return [t.strip() for t in value.split(",") if t.strip()]


def decide_upgrade(offer: str | None, allowed: Collection[str]) -> UpgradeDecision:
    """What to do with an HTTP/1.1 request that asks for an upgrade (``Connection:
    upgrade``) offering `offer` (its Upgrade header, None when absent)."""
    if offer is None:
        return UpgradeDecision(Verdict.REFUSE, reason=EMPTY)
    offered = tokens(offer)
    if not offered:
        return UpgradeDecision(Verdict.REFUSE, reason=EMPTY)
    if all(t.lower() == H2C for t in offered):
        return UpgradeDecision(Verdict.PLAIN, reason=H2C_STRIPPED)
    if len(offered) > 1:
        return UpgradeDecision(Verdict.REFUSE, reason=SEVERAL_TOKENS)
    token = offered[0]
    if token.lower() == H2C or token.lower() not in {a.lower() for a in allowed}:
        return UpgradeDecision(Verdict.REFUSE, reason=NOT_ALLOWED)
    return UpgradeDecision(Verdict.UPGRADE, token=token)


def connect_refusal(path: str, version: str) -> str:
    """The reason a CONNECT request is refused: extended CONNECT (HTTP/2 with :protocol,
    which also carries :path) or plain CONNECT."""
    return EXTENDED_CONNECT if version == "2" and path else CONNECT


def completes(offered: str, answered: str | None) -> bool:
    """Does a 101 whose Upgrade header is `answered` switch to the protocol offered?"""
    if answered is None:
        return False
    switched = tokens(answered)
    return len(switched) == 1 and switched[0].lower() == offered.lower()
