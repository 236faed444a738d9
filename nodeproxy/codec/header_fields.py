"""One view of a request's header fields (RFC 9110 5.2, 5.3): each name once.

Routing (header matches), authorization (``when: request.headers[...]``) and the
upstream see the same value for a name, whatever a client sends:

- A field whose grammar is a list, and any field the proxy knows nothing about, keeps
  every value: repeated lines are joined, in order, with ", " (RFC 9110 5.3) into one
  line, which is what goes upstream.  ``cookie`` lines are joined with "; " (RFC 9113
  8.2.3; h2 already does this for HTTP/2).
- A field whose grammar is a single value (``SINGLETONS``) sent twice is refused: it has
  no one meaning (RFC 9110 5.3: a recipient cannot combine it; nginx takes the first,
  others the last).  Repeated ``content-length`` lines that agree are one line
  (RFC 9110 8.6); lines that disagree are refused.

Names are lowercase already (the codecs' job); the order of first appearance is kept.
A head without a repeated name (nearly every request) is returned as it is.
"""

from __future__ import annotations

from nodeproxy.codec.message import Headers
from nodeproxy.codec.request_target import Refusal

# Request fields whose grammar is one value (RFC 9110 and the specifications named).
SINGLETONS = frozenset({
    "host",  # RFC 9110 7.2
    "authorization", "proxy-authorization",  # 11.6.2, 11.7.2
    "content-type", "content-location", "content-range",  # 8.3, 8.7, 14.4
    "from", "referer", "user-agent", "max-forwards",  # 10.1.2, 10.1.3, 10.1.5, 7.6.2
    "date", "if-modified-since", "if-unmodified-since", "if-range", "range",  # 6.6.1, 13, 14
    "origin",  # RFC 6454 7
    "access-control-request-method",  # Fetch
    "sec-websocket-key",  # RFC 6455 11.3.1
    "x-request-id",  # the request's id in logs and traces: two would name two requests
    "grpc-timeout", "grpc-encoding",  # gRPC over HTTP/2
})
# Not here: traceparent (W3C Trace Context makes a repeated one invalid, which the
# tracing code answers with a fresh trace, not a refusal).
# Joined with "; " instead of ", ".
SEMICOLON_JOINED = frozenset({"cookie"})


def joined_value(headers: Headers, name: str) -> str | None:
    """The one value of a (lowercase) name, its lines joined as one_view joins them; None
    when absent.  What the policies read of a head (policy/authorization.py,
    http/authorize.py)."""
    values = [v for k, v in headers if k == name]
    if not values:
        return None
    return ("; " if name in SEMICOLON_JOINED else ", ").join(values)


def one_view(headers: Headers) -> Headers:
    """`headers` with each name once (see the module docstring).  Raises Refusal
    (reason ``repeated_<name>`` for a singleton, ``content_length_mismatch``)."""
    names = {name for name, _ in headers}
    if len(names) == len(headers):
        return headers
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name, []).append(value)
    joined: Headers = []
    for name, found in values.items():
        if len(found) == 1:
            joined.append((name, found[0]))
        elif name == "content-length":
            if len(set(found)) != 1:
                raise Refusal("content_length_mismatch",
                                  f"content-length lines disagree: {found[:4]!r}")
            joined.append((name, found[0]))
        elif name in SINGLETONS:
            raise Refusal(f"repeated_{name.replace('-', '_')}",
                              f"{name} sent {len(found)} times")
        else:
            joined.append((name, ("; " if name in SEMICOLON_JOINED else ", ").join(found)))
    return joined
