"""Trace context in request headers: reading W3C Trace Context and B3, writing them back.

Pure functions, no SDK: ``extract`` reads one request's headers in one pass, ``inject``
replaces the trace headers with the proxy's own span as the parent.

Formats, in the order they are trusted when several arrive:

- W3C ``traceparent`` (``version-traceid-parentid-flags``) with ``tracestate``.  Per the
  W3C Trace Context spec: lowercase hex only; version ``ff`` is invalid; version ``00`` is
  exactly 55 characters; a later version may carry more fields after the flags (ignored);
  all-zero trace or parent ids are invalid; two ``traceparent`` headers are invalid.
  ``tracestate`` is passed on unchanged (its headers joined with ",") when the
  ``traceparent`` was valid, and dropped otherwise, as the spec asks; a malformed one
  (a bad member, a key twice, over 32 members) is dropped and reported as
  ``tracestate``.
- B3 multi-header (``x-b3-traceid`` 16 or 32 hex, ``x-b3-spanid`` 16 hex,
  ``x-b3-sampled`` "1"/"0", ``x-b3-flags`` "1" = debug, which implies sampled).  Only
  ``x-b3-sampled`` or ``x-b3-flags`` without ids is a sampling decision with no parent.
- B3 single header ``b3: {traceid}-{spanid}[-{sampling}[-{parentspanid}]]``, or just a
  sampling decision ``b3: 0|1|d``.

A header that is present and malformed is reported in ``Incoming.invalid`` (the caller
counts it) and ignored: the next format is tried, else a new trace starts.  Nothing of a
malformed header reaches the upstream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodeproxy.codec.message import Headers

W3C = "w3c"
TRACESTATE = "tracestate"
B3_MULTI = "b3multi"
B3_SINGLE = "b3single"

# Every header ``inject`` owns: removed from the request and written anew.
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "x-b3-traceid", "x-b3-spanid",
                           "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3"})
_HEX = frozenset("0123456789abcdef")
# A tracestate list member (W3C Trace Context: simple or multi-tenant key, value of
# printable ASCII without "," and "=", not ending in a space).
_MEMBER = re.compile(r"(?:[a-z][a-z0-9_\-*/]{0,255}|[a-z0-9][a-z0-9_\-*/]{0,240}"
                     r"@[a-z][a-z0-9_\-*/]{0,13})"
                     r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
MAX_TRACESTATE_MEMBERS = 32


@dataclass(frozen=True, slots=True)
class Incoming:
    """What a request's headers said about its trace.

    ``trace_id`` and ``span_id`` are 0 when no valid parent arrived; ``sampled`` is None
    when no sampling decision did.  ``b3_multi``/``b3_single``: that B3 form was present
    (valid or not), so the upstream gets the proxy's context in it too.
    """

    trace_id: int = 0
    span_id: int = 0
    sampled: bool | None = None
    debug: bool = False
    tracestate: str | None = None
    b3_multi: bool = False
    b3_single: bool = False
    invalid: tuple[str, ...] = ()
    b3_short: bool = False  # the parent's B3 trace id had 16 hex digits: B3 out keeps that


NONE = Incoming()


def _hex_id(value: str, lengths: tuple[int, ...]) -> int:
    """A lowercase-hex id of one of these lengths, as an int; 0 when malformed or zero."""
    if len(value) not in lengths or not _HEX.issuperset(value):
        return 0
    return int(value, 16)


def parse_traceparent(value: str) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a valid traceparent value, else None."""
    value = value.strip(" \t")
    parts = value.split("-")
    if len(parts) < 4:
        return None
    version, trace, parent, flags = parts[0], parts[1], parts[2], parts[3]
    if len(version) != 2 or not _HEX.issuperset(version) or version == "ff":
        return None
    if version == "00" and (len(parts) != 4 or len(value) != 55):
        return None
    if len(flags) != 2 or not _HEX.issuperset(flags):
        return None
    trace_id, span_id = _hex_id(trace, (32,)), _hex_id(parent, (16,))
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def valid_tracestate(value: str) -> bool:
    """At most 32 well-formed list members with distinct keys (empty members allowed)."""
    keys = set()
    for member in value.split(","):
        member = member.strip(" \t")
        if not member:
            continue
        if not _MEMBER.fullmatch(member):
            return False
        keys.add(member.split("=", 1)[0])
        if len(keys) > MAX_TRACESTATE_MEMBERS:
            return False
    return len(keys) == sum(1 for m in value.split(",") if m.strip(" \t"))


def _b3_sampled(value: str) -> tuple[bool | None, bool] | None:
    """(sampled, debug) of a B3 sampling field, None when malformed."""
    value = value.strip()
    if value in ("1", "true"):
        return True, False
    if value in ("0", "false"):
        return False, False
    if value == "d":
        return True, True
    return None


def parse_b3_single(value: str) -> tuple[int, int, bool | None, bool] | None:
    """(trace id, span id, sampled, debug) of a valid ``b3`` value (ids 0 for a bare
    sampling decision), else None."""
    value = value.strip()
    parts = value.split("-")
    if len(parts) == 1:
        decision = _b3_sampled(value)
        return None if decision is None else (0, 0, decision[0], decision[1])
    if len(parts) > 4:
        return None
    trace_id, span_id = _hex_id(parts[0], (16, 32)), _hex_id(parts[1], (16,))
    if not trace_id or not span_id:
        return None
    sampled: bool | None = None
    debug = False
    if len(parts) >= 3:
        decision = _b3_sampled(parts[2])
        if decision is None:
            return None
        sampled, debug = decision
    if len(parts) == 4 and not _hex_id(parts[3], (16,)):
        return None
    return trace_id, span_id, sampled, debug


def parse_b3_multi(trace: str | None, span: str | None, sampled: str | None,
                   flags: str | None) -> tuple[int, int, bool | None, bool] | None:
    """(trace id, span id, sampled, debug) of valid B3 multi headers, else None."""
    debug = False
    decision: bool | None = None
    if flags is not None:
        if flags.strip() == "1":
            debug, decision = True, True
        elif flags.strip() != "0":
            return None
    if sampled is not None and not debug:
        parsed = _b3_sampled(sampled)
        if parsed is None or parsed[1]:
            return None
        decision = parsed[0]
    if trace is None and span is None:
        return 0, 0, decision, debug
    if trace is None or span is None:
        return None
    trace_id, span_id = _hex_id(trace.strip(), (16, 32)), _hex_id(span.strip(), (16,))
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, decision, debug


def extract(headers: Headers) -> Incoming:
    """The trace context a request arrived with (see the module docstring)."""
    traceparent: list[str] = []
    tracestate: list[str] = []
    b3_trace = b3_span = b3_sampled = b3_flags = b3 = None
    seen_multi = False
    for name, value in headers:
        if name not in TRACE_HEADERS:
            continue
        if name == "traceparent":
            traceparent.append(value)
        elif name == "tracestate":
            tracestate.append(value)
        elif name == "b3":
            b3 = value
        else:
            seen_multi = True
            if name == "x-b3-traceid":
                b3_trace = value
            elif name == "x-b3-spanid":
                b3_span = value
            elif name == "x-b3-sampled":
                b3_sampled = value
            elif name == "x-b3-flags":
                b3_flags = value
    invalid: list[str] = []
    short = False  # the B3 parent's trace id had 16 hex digits
    found: tuple[int, int, bool | None, bool] | None = None
    state = None
    if traceparent:
        w3c = parse_traceparent(traceparent[0]) if len(traceparent) == 1 else None
        if w3c is None:
            invalid.append(W3C)
        else:
            found = (w3c[0], w3c[1], w3c[2], False)
            state = ",".join(tracestate) if tracestate else None
            if state is not None and not valid_tracestate(state):
                invalid.append(TRACESTATE)
                state = None
    decision: bool | None = None
    debug = False
    if seen_multi:
        multi = parse_b3_multi(b3_trace, b3_span, b3_sampled, b3_flags)
        if multi is None:
            invalid.append(B3_MULTI)
        elif found is None:
            if multi[0]:
                found = multi
                short = len((b3_trace or "").strip()) == 16
            else:
                decision, debug = multi[2], multi[3]
    if b3 is not None:
        single = parse_b3_single(b3)
        if single is None:
            invalid.append(B3_SINGLE)
        elif found is None:
            if single[0]:
                found = single
                short = len(b3.strip().split("-", 1)[0]) == 16
            elif decision is None:
                decision, debug = single[2], single[3]
    if found is not None:
        return Incoming(found[0], found[1], found[2], found[3], state, seen_multi,
                        b3 is not None, tuple(invalid),
                        short)
    if decision is None and not debug and not seen_multi and b3 is None and not invalid:
        return NONE
    return Incoming(0, 0, decision, debug, None, seen_multi, b3 is not None, tuple(invalid))


def traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def _b3_trace(trace_id: int, short: bool) -> str:
    return f"{trace_id:016x}" if short and trace_id < 1 << 64 else f"{trace_id:032x}"


def inject(headers: Headers, incoming: Incoming, trace_id: int, span_id: int,
           sampled: bool) -> None:
    """Replace the trace headers in place: W3C always (tracestate passed on when it came
    with a valid traceparent); B3 in each form that arrived, the incoming span as the
    B3 parent."""
    headers[:] = [h for h in headers if h[0] not in TRACE_HEADERS]
    headers.append(("traceparent", traceparent(trace_id, span_id, sampled)))
    if incoming.tracestate is not None:
        headers.append(("tracestate", incoming.tracestate))
    if incoming.b3_multi:
        headers.append(("x-b3-traceid", _b3_trace(trace_id, incoming.b3_short)))
        headers.append(("x-b3-spanid", f"{span_id:016x}"))
        if incoming.span_id:
            headers.append(("x-b3-parentspanid", f"{incoming.span_id:016x}"))
        if incoming.debug:
            headers.append(("x-b3-flags", "1"))
        else:
            headers.append(("x-b3-sampled", "1" if sampled else "0"))
    if incoming.b3_single:
        flag = "d" if incoming.debug else ("1" if sampled else "0")
        value = f"{_b3_trace(trace_id, incoming.b3_short)}-{span_id:016x}-{flag}"
        if incoming.span_id:
            value += f"-{incoming.span_id:016x}"
        headers.append(("b3", value))
