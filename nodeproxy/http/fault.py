"""Fault injection on a route rule: delay and abort a share of its requests.

Compiled once per configuration from the rule's ``fault`` (Istio's HTTPFaultInjection).
Per request the manager asks ``eligible`` (the rule's header matches, if any), then
``delay`` (seconds to hold the request, or 0) and then ``abort`` (what to answer
instead of sending it, or None): each draw is independent, so a delayed request may
also be aborted.  An abort with a gRPC status applies to gRPC requests only: a plain
HTTP client could not read it.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from nodeproxy.codec.message import RequestHead
from nodeproxy.config.model import FaultInjection, HeaderMatch

ABORT_BODY = "fault filter abort"


@dataclass(frozen=True)
class Abort:
    http_status: int  # for a gRPC request with no grpc_code: mapped to a gRPC code
    grpc_code: int | None


def _header_test(match: HeaderMatch) -> Callable[[str | None], bool]:
    if match.type == "RegularExpression":
        pattern = re.compile(match.value)
        return lambda v: v is not None and pattern.fullmatch(v) is not None
    value = match.value
    return lambda v: v == value


class Fault:
    """One rule's faults."""

    def __init__(self, config: FaultInjection):
        self.config = config
        delay = config.delay
        self._delay_seconds = delay.fixed_delay_seconds if delay is not None else 0.0
        self._delay_share = delay.percentage / 100.0 if delay is not None else 0.0
        abort = config.abort
        self._abort_share = abort.percentage / 100.0 if abort is not None else 0.0
        self._abort: Abort | None = None
        if abort is not None:
            self._abort = Abort(abort.http_status or 200, abort.grpc_status)
        self._headers = tuple((h.name, _header_test(h)) for h in config.headers)

    def eligible(self, head: RequestHead) -> bool:
        """Does the request carry every header the fault asks for?"""
        for name, test in self._headers:
            if not test(head.header(name)):
                return False
        return True

    def delay(self, rng: random.Random) -> float:
        """Seconds to hold this request (0: none)."""
        if self._delay_share and rng.random() < self._delay_share:
            return self._delay_seconds
        return 0.0

    def abort(self, head: RequestHead, rng: random.Random) -> Abort | None:
        """The answer to give instead of sending the request, or None."""
        abort = self._abort
        if abort is None or (abort.grpc_code is not None and not head.is_grpc):
            return None
        if self._abort_share and rng.random() < self._abort_share:
            return abort
        return None
