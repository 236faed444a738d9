"""SPIFFE IDs of mesh workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

Parsing is strict: only that exact shape is a workload identity here. Anything else (another
scheme, a missing or extra path segment, an empty segment, a character outside the SPIFFE
alphabet, a port, userinfo, a query or a fragment) is refused with `IdentityError` whose
`reason` is "not_spiffe" and whose message says what was wrong.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

SCHEME = "spiffe://"
MAX_ID_LENGTH = 2048       # SPIFFE ID spec: URIs longer than this are refused
MAX_TRUST_DOMAIN = 255

# SPIFFE ID spec: trust domain = lowercase letters, digits, ".", "-", "_";
# path segments = letters, digits, ".", "-", "_" (and never "." or "..").
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")


class IdentityError(Exception):
    """An identity could not be used; `reason` is a short machine label (metrics, logs).

    `str(error)` is the human message (it names files, values and what is wrong).
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed workload identity."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def validate_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a valid SPIFFE trust domain name, else raise."""
    if not trust_domain:
        raise IdentityError("not_spiffe", "trust domain is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN:
        raise IdentityError("not_spiffe", f"trust domain is longer than {MAX_TRUST_DOMAIN}")
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise IdentityError(
            "not_spiffe",
            f"trust domain {trust_domain!r} may contain only lowercase letters, digits, "
            "'.', '-' and '_'",
        )
    return trust_domain


def _validate_segment(what: str, value: str, uri: str | None = None) -> str:
    where = f" in {uri!r}" if uri is not None else ""
    if not value:
        raise IdentityError("not_spiffe", f"{what} is empty{where}")
    if value in (".", ".."):
        raise IdentityError("not_spiffe", f"{what} may not be {value!r}{where}")
    if not _SEGMENT_RE.fullmatch(value):
        raise IdentityError(
            "not_spiffe",
            f"{what} {value!r}{where} may contain only letters, digits, '.', '-' and '_'",
        )
    return value


@functools.lru_cache(maxsize=4096)
def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """The SPIFFE ID URI of a workload; raises IdentityError if a part is not valid.
    Pure, and asked for on every proxied connection: the last few thousand are kept (a
    refusal is not, it is raised again)."""
    validate_trust_domain(trust_domain)
    _validate_segment("namespace", namespace)
    _validate_segment("service account", service_account)
    return f"{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_spiffe_id(uri: str) -> SpiffeId:
    """Parse `spiffe://<td>/ns/<ns>/sa/<sa>`; raise IdentityError("not_spiffe", why) otherwise."""
    if not isinstance(uri, str):
        raise IdentityError("not_spiffe", f"SPIFFE ID must be a string, not {type(uri).__name__}")
    if len(uri) > MAX_ID_LENGTH:
        raise IdentityError("not_spiffe", f"SPIFFE ID is longer than {MAX_ID_LENGTH} characters")
    if not uri.startswith(SCHEME):
        scheme = uri.partition(":")[0] if ":" in uri else ""
        detail = f"scheme {scheme!r}" if scheme else "no scheme"
        raise IdentityError("not_spiffe", f"{uri!r} is not a SPIFFE ID ({detail}; want spiffe://)")
    rest = uri[len(SCHEME):]
    if "?" in rest:
        raise IdentityError("not_spiffe", f"SPIFFE ID {uri!r} has a query")
    if "#" in rest:
        raise IdentityError("not_spiffe", f"SPIFFE ID {uri!r} has a fragment")
    trust_domain, slash, path = rest.partition("/")
    if "@" in trust_domain:
        raise IdentityError("not_spiffe", f"SPIFFE ID {uri!r} has userinfo")
    if ":" in trust_domain:
        raise IdentityError("not_spiffe", f"SPIFFE ID {uri!r} has a port")
    try:
        validate_trust_domain(trust_domain)
    except IdentityError as e:
        raise IdentityError("not_spiffe", f"SPIFFE ID {uri!r}: {e}") from None
    if not slash or not path:
        raise IdentityError(
            "not_spiffe", f"SPIFFE ID {uri!r} has no workload path (want /ns/<ns>/sa/<sa>)"
        )
    segments = path.split("/")
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise IdentityError(
            "not_spiffe", f"SPIFFE ID {uri!r}: path must be exactly /ns/<namespace>/sa/<sa>"
        )
    namespace = _validate_segment("namespace", segments[1], uri)
    service_account = _validate_segment("service account", segments[3], uri)
    return SpiffeId(trust_domain, namespace, service_account)
