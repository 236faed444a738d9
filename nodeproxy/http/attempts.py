"""The router's decision after each attempt: retry, answer locally, or pass the response on.

A pure function (``next_step``) of what the router knows when an attempt has ended:

- the route rule's retry policy and the request's method;
- how the attempt ended (``Result``): an upstream response (status, grpc-status), no
  response (Envoy's flag UF connect failure, UC reset, UT per-try timeout, and whether
  the stream was refused), the client's side breaking off (DC), a 101 nobody asked for
  (UPE), or no attempt at all because the cluster had no endpoint to pick (UH), the
  destination's policy denied it (UAEX) or its circuit breaker refused it (UO);
- the request so far (``Progress``): attempts made, whether the body can be sent again,
  whether the client is still there, and what the retry budget and the circuit breaker's
  retry slots would say to one more retry.

It returns a ``Step``: what to do (``Action``), the flags and local reply that go with
it, and which of the stateful checks the router must charge (the retry budget, a retry
slot), so the caller's side effects are exactly those the decision consulted.  The
request timeout that bounds every attempt is enforced by the router's timer; what
happens when it fires is ``request_timeout``.  No I/O, no clock, no randomness: the
backoff delay is retry.backoff_delay's, drawn by the caller.

The order of the checks is Envoy's router's: a client that broke off ends everything; a
response the retry policy does not match is passed on; a match is retried only while
attempts remain, the body is replayable and the client is there, then only if the
budget has room, then only if the breaker has a retry slot (a refused stream, which the
upstream never processed, needs none).  A failure that is not retried is the last
attempt's: its response goes back, or a local 503 (504 after a per-try timeout) with
its flag; ``URX`` marks a retried request that still failed.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from nodeproxy.config.model import RetryPolicy
from nodeproxy.http.circuit_breaker import OVERFLOW_TEXT
from nodeproxy.http.retry import PER_TRY_TIMEOUT, should_retry


class Ended(enum.Enum):
    """How one attempt ended."""

    RESPONSE = "response"  # the upstream answered with a head
    NO_RESPONSE = "no_response"  # UF, UC or UT before a head (flag says which)
    CLIENT_GONE = "client_gone"  # DC: the client's body broke off while sending
    UNEXPECTED_101 = "unexpected_101"  # UPE: a 101 to a request that offered no upgrade
    OVERFLOW = "overflow"  # UO: the circuit breaker refused the request (or its pending wait)
    NO_HEALTHY_UPSTREAM = "no_healthy_upstream"  # UH: no cluster, no endpoint, all ejected
    DENIED = "denied"  # UAEX: the destination's authorization policy refused it


class Result:
    """One attempt's end, as the router saw it.  One per attempt: a class with a written
    ``__init__``, which a compiled build compiles (a NamedTuple's ``__new__`` stays
    interpreted Python; docs/benchmarks.md, "L7 per-request cost, thirteenth round")."""

    ended: Ended
    status: int | None  # RESPONSE: the response status
    grpc_status: int | None  # RESPONSE: grpc-status of the response head
    flag: str | None  # NO_RESPONSE: "UF", "UC" or "UT"
    refused_stream: bool  # NO_RESPONSE: HTTP/2 REFUSED_STREAM
    # CLIENT_GONE: the status to answer when the client's request turned out malformed
    # or too slow (400, 408) and nothing was answered yet; None: the client left.
    malformed_status: int | None

    def __init__(self, ended: Ended, status: int | None = None,
                 grpc_status: int | None = None, flag: str | None = None,
                 refused_stream: bool = False, malformed_status: int | None = None):
        self.ended = ended
        self.status = status
        self.grpc_status = grpc_status
        self.flag = flag
        self.refused_stream = refused_stream
        self.malformed_status = malformed_status

    def __repr__(self) -> str:
        return (f"Result({self.ended}, status={self.status}, grpc_status={self.grpc_status}, "
                f"flag={self.flag}, refused_stream={self.refused_stream}, "
                f"malformed_status={self.malformed_status})")

    @classmethod
    def response(cls, status: int, grpc_status: int | None = None) -> Result:
        return Result(Ended.RESPONSE, status, grpc_status)

    @classmethod
    def no_response(cls, flag: str, *, refused_stream: bool = False) -> Result:
        return Result(Ended.NO_RESPONSE, None, None, flag, refused_stream)


class Progress(NamedTuple):
    """The request as the attempt leaves it."""

    attempts: int  # attempts made, the one just ended included
    body_replayable: bool = True  # the request body is buffered whole (or empty)
    client_gone: bool = False
    budget_has_room: bool = True  # retry.RetryBudget.has_room()
    retry_slot_free: bool = True  # circuit_breaker.CircuitBreaker.retry_slot_free()


class Action(enum.Enum):
    RETRY = "retry"  # back off, then a new attempt (backend and endpoint drawn afresh)
    RESPOND = "respond"  # stream the attempt's upstream response to the client
    REPLY = "reply"  # answer locally with ``status`` and ``text``
    RESET = "reset"  # reset the client's exchange (it has a response head already)
    ABANDON = "abandon"  # the client went away: nothing to answer


# Why a retriable failure was not retried (Step.not_retried), for tests and logs.
ATTEMPTS_USED = "attempts_used"
BODY_NOT_REPLAYABLE = "body_not_replayable"
CLIENT_LEFT = "client_left"
BUDGET_EXHAUSTED = "budget_exhausted"
RETRY_OVERFLOW = "retry_overflow"

NO_RESPONSE_TEXT = ("upstream connect error or disconnect/reset before headers. "
                    "reset reason: {}")
TIMEOUT_TEXT = "upstream request timeout"
UPSTREAM_PROTOCOL_ERROR_TEXT = "upstream protocol error"


class Step(NamedTuple):
    """What the router does next (see the module docstring)."""

    action: Action
    flags: tuple[str, ...] = ()  # response flags to add to the request's, in order
    status: int = 0  # REPLY: the local reply's status
    text: str | None = None  # REPLY: its body; None: local_reply's text for the status
    # The stateful checks this decision consulted, which the caller now charges: a
    # withdrawal from the retry budget (refused: counted as exhausted) and a retry slot of
    # the breaker (refused: counted as an overflow).
    spend_budget: bool = False
    take_retry_slot: bool = False
    not_retried: str | None = None  # a retriable failure not retried: why
    retry_reason: str = ""  # RETRY: the label of nodeproxy_http_retries_total
    upgrade_refusal: bool = False  # count an unexpected 101 (upgrade.UNEXPECTED_101)


def next_step(policy: RetryPolicy, method: str, result: Result, progress: Progress) -> Step:
    """What to do after an attempt (see the module docstring)."""
    ended = result.ended
    if ended is Ended.NO_HEALTHY_UPSTREAM:
        return Step(Action.REPLY, ("UH",), 503)
    if ended is Ended.DENIED:
        return Step(Action.REPLY, ("UAEX",), 403)
    if ended is Ended.OVERFLOW:
        return Step(Action.REPLY, ("UO",), 503, OVERFLOW_TEXT)
    if ended is Ended.CLIENT_GONE:
        if result.malformed_status is not None:
            status = result.malformed_status
            return Step(Action.REPLY, (), status,
                        "request timeout" if status == 408 else "bad request")
        return Step(Action.ABANDON)
    if ended is Ended.UNEXPECTED_101:
        # Never a tunnel, never retried.
        return Step(Action.REPLY, ("UPE",), 502, UPSTREAM_PROTOCOL_ERROR_TEXT,
                    upgrade_refusal=True)
    retriable = should_retry(policy, method, flag=result.flag,
                             refused_stream=result.refused_stream, status=result.status,
                             grpc_status=result.grpc_status)
    if not retriable:
        return _RESPOND if ended is Ended.RESPONSE else _final(result, ())
    retried = ("URX",) if progress.attempts > 1 else ()
    if progress.attempts > policy.attempts:
        return _final(result, retried, ATTEMPTS_USED)
    if not progress.body_replayable:
        return _final(result, retried, BODY_NOT_REPLAYABLE)
    if progress.client_gone:
        return _final(result, retried, CLIENT_LEFT)
    if not progress.budget_has_room:
        return _final(result, retried, BUDGET_EXHAUSTED, spend_budget=True)
    # maxRetries retries in progress: no retry, counted as an overflow.  A refused stream
    # (the upstream did not process it, e.g. above a GOAWAY) is exempt.
    slot = not result.refused_stream
    if slot and not progress.retry_slot_free:
        return _final(result, retried, RETRY_OVERFLOW, spend_budget=True,
                      take_retry_slot=True)
    return Step(Action.RETRY, spend_budget=True, take_retry_slot=slot,
                retry_reason=result.flag if result.flag is not None else str(result.status))


_RESPOND = Step(Action.RESPOND)  # the common case, built once


def settled(policy: RetryPolicy, method: str, result: Result) -> Step | None:
    """next_step's decision when no part of the request's progress can change it: a
    response the policy does not retry (the common case) is passed on, whatever the
    attempts, body, client, budget and breaker.  None: ask next_step."""
    if result.ended is Ended.RESPONSE and not should_retry(
            policy, method, flag=result.flag, refused_stream=result.refused_stream,
            status=result.status, grpc_status=result.grpc_status):
        return _RESPOND
    return None


def _final(result: Result, flags: tuple[str, ...], not_retried: str | None = None, *,
           spend_budget: bool = False, take_retry_slot: bool = False) -> Step:
    """The attempt's failure goes back as it is: its response, or a local reply."""
    if result.ended is Ended.RESPONSE:
        return Step(Action.RESPOND, flags, not_retried=not_retried,
                    spend_budget=spend_budget, take_retry_slot=take_retry_slot)
    flag = result.flag or "UC"
    if flag == PER_TRY_TIMEOUT:
        status, text = 504, TIMEOUT_TEXT
    else:
        status = 503
        text = NO_RESPONSE_TEXT.format("connection failure" if flag == "UF"
                                       else "connection termination")
    return Step(Action.REPLY, (*flags, flag), status, text, not_retried=not_retried,
                spend_budget=spend_budget, take_retry_slot=take_retry_slot)


def request_timeout(responded: bool) -> Step:
    """The rule's request timeout ran out (over all attempts and backoffs): 504 UT, or a
    reset when the response has begun already."""
    if responded:
        return Step(Action.RESET, ("UT",))
    return Step(Action.REPLY, ("UT",), 504, TIMEOUT_TEXT)
