"""A traced request's first decision, compiled with the request path (nodeproxy/native.py):
did a trace context arrive, and if none did, is the request sampled?

Most requests bring no trace header and, at a low sampling percentage, are not sampled:
for them the decision is the whole of tracing's per-request work (one draw, one for the
new ids, a ``traceparent`` appended with the sampled flag 0), done here without entering
the interpreted tracer (request_spans.py, which the OpenTelemetry SDK's types keep out
of the compiled group).  ``Tracer.begin`` makes the same decision through this function,
so both paths draw the same numbers in the same order.
"""

from __future__ import annotations

import random
from typing import Final

from nodeproxy.codec.message import Headers
from nodeproxy.telemetry.trace_headers import TRACE_HEADERS

# What first_decision found: nothing left to do (unsampled, headers written), a fresh
# trace to sample, or a context that arrived (the tracer parses it).
UNSAMPLED: Final = 0
SAMPLED: Final = 1
INCOMING: Final = 2
_SPAN_MASK: Final = (1 << 64) - 1


def first_decision(headers: Headers, rng: random.Random, ratio: float) -> int:
    """UNSAMPLED (a ``traceparent`` with new ids and the sampled flag 0 appended to
    `headers`), SAMPLED (no context arrived, the draw says sample it) or INCOMING (a
    trace header arrived: nothing drawn)."""
    for name, _ in headers:
        if name in TRACE_HEADERS:
            return INCOMING
    if rng.random() < ratio:
        return SAMPLED
    bits = rng.getrandbits(192)
    # One printf-style format (a compiled f-string with format specs calls format() per
    # field and joins the pieces): the same text.
    headers.append(("traceparent", "00-%032x-%016x-00" % ((bits >> 64) or 1,  # noqa: UP031
                                                          (bits & _SPAN_MASK) or 1)))
    return UNSAMPLED
