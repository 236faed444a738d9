"""The request target: validated once, normalized once, and the one path everything uses.

A request's path means one thing in the proxy: routing (routes.py), authorization
(policy/authorization.py) and the upstream all see the target this module returns, so
a backend can never act on a path other than the one the policies judged.

Validation (``check_target``, ``check_method``, ``check_authority``) is the codecs' job
and refuses what is malformed: HTTP/1.1 (RFC 9112 3.2) gets 400, an HTTP/2 stream
(RFC 9113 8.3) is reset with PROTOCOL_ERROR.  Accepted targets are the origin form
(``/path?query``) and, for OPTIONS only, the asterisk form; the absolute form
(``http://host/path``) and the authority form are refused, as are a fragment, bytes
outside visible ASCII, and a malformed ``%`` escape.

Normalization (``normalize``) follows Istio's ``pathNormalization`` modes and Envoy's
escaped-slash actions, in this order, on the path only (the query string is passed on
untouched):

1. ``%00`` is refused in every mode (Istio does the same).
2. Escaped slashes (``%2F``, ``%5C``, any case): kept, refused, or decoded to ``/`` and
   ``\\`` (then redirected to, or forwarded).
3. BASE and stronger: escapes of unreserved characters (RFC 3986 2.3) decoded, other
   escapes upper-cased (one pass: ``%2561`` stays ``%2561``), ``\\`` turned into ``/``.
4. MERGE_SLASHES and DECODE_AND_MERGE_SLASHES: runs of ``/`` merged into one.
5. BASE and stronger: ``.`` and ``..`` segments removed (RFC 3986 5.2.4; ``..`` above
   the root stays at the root).

Slashes are merged before dot segments are resolved, as nginx and a file system read a
path: ``/public//../admin`` is ``/admin`` (Envoy, resolving first, gets
``/public/admin``).  Either is safe because what is judged is what is forwarded; this
order judges the request as what its sender meant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from nodeproxy.config.model import EscapedSlashAction, PathNormalizationMode

if TYPE_CHECKING:
    from nodeproxy.config.model import HttpSettings

MODES: tuple[PathNormalizationMode, ...] = get_args(PathNormalizationMode)
ESCAPED_SLASH_ACTIONS: tuple[EscapedSlashAction, ...] = get_args(EscapedSlashAction)

# RFC 9110 5.6.2 token (a method); RFC 3986 3.2.2 reg-name / IP-literal and 3.2.3 port.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_AUTHORITY = re.compile(r"(?:\[[0-9A-Za-z:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPED_SLASH = re.compile(r"%(2[Ff]|5[Cc])")
_SLASHES = re.compile(r"/{2,}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")


class Refusal(ValueError):
    """A request refused before it is routed (its target, method, authority or header
    fields).  ``reason`` is one of a fixed set of labels
    (nodeproxy_http_bad_requests_total{reason}); the message may quote the request and
    is only logged."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """How targets are normalized: the node's ``http.pathNormalization`` and the
    escaped-slash action in effect."""

    mode: PathNormalizationMode = "MERGE_SLASHES"
    escaped_slashes: EscapedSlashAction = "REJECT_REQUEST"

    @classmethod
    def of(cls, settings: HttpSettings) -> TargetPolicy:
        return cls(settings.path_normalization, settings.escaped_slashes_in_effect)


@dataclass(init=False)
class Normalized:
    """A normalized target: ``target`` goes upstream (path and query), ``path`` is what
    routes and policies match; ``redirect``: answer 307 to ``target`` instead
    (UNESCAPE_AND_REDIRECT found escaped slashes).  One per request: a class with a
    written ``__init__``, which a compiled build compiles (a NamedTuple's ``__new__``
    stays interpreted Python; docs/benchmarks.md, "L7 per-request cost, eleventh
    round")."""

    target: str
    path: str
    redirect: bool

    def __init__(self, target: str, path: str, redirect: bool = False):
        self.target = target
        self.path = path
        self.redirect = redirect


# --- validation ---------------------------------------------------------------------------


def check_method(method: str) -> None:
    if not _TOKEN.fullmatch(method):
        raise Refusal("bad_method", f"method {method!r} is not a token")


def check_authority(authority: str) -> None:
    """A Host or :authority: host and optional port, no userinfo (RFC 9113 8.3.1)."""
    if "@" in authority:
        raise Refusal("bad_authority", f"authority {authority!r} carries userinfo")
    if not _AUTHORITY.fullmatch(authority):
        raise Refusal("bad_authority", f"authority {authority!r} is malformed")


def check_target(method: str, target: str) -> None:
    """The request target of `method`: origin form, or ``*`` for OPTIONS."""
    if method == "CONNECT":
        raise Refusal("connect", "CONNECT is not proxied")
    if target == "*":
        if method != "OPTIONS":
            raise Refusal("asterisk_form", f"'*' is a target for OPTIONS only ({method})")
        return
    if not target:
        raise Refusal("empty_target", "empty request target")
    if not target.startswith("/"):
        if _SCHEME.match(target):
            raise Refusal("absolute_form", f"absolute-form target {target[:64]!r}")
        raise Refusal("bad_target", f"target {target[:64]!r} is not in origin form")
    if not _VISIBLE_ASCII.fullmatch(target):
        raise Refusal("bad_target_char", f"target {target[:64]!r} has a byte outside "
                                              "visible ASCII")
    if "#" in target:
        raise Refusal("fragment", f"target {target[:64]!r} carries a fragment")
    if "%" in target and _BAD_ESCAPE.search(target):
        raise Refusal("bad_escape", f"target {target[:64]!r} has a malformed % escape")


# --- normalization ------------------------------------------------------------------------


def _decode_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else "%" + match.group(1).upper()


def _unescape_slash(match: re.Match[str]) -> str:
    return "/" if match.group(1) in ("2F", "2f") else "\\"


def remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for an absolute path (``..`` never climbs above the root)."""
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment in (".", ".."):
            if segment == ".." and out:
                out.pop()
            if i == last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def normalize_path(path: str, policy: TargetPolicy) -> tuple[str, bool]:
    """The path (no query) normalized by `policy`, and whether escaped slashes were
    decoded.  Raises Refusal for ``%00`` and, under REJECT_REQUEST, escaped slashes."""
    if path == "*":
        return path, False
    if "%" in path:
        if "%00" in path:
            raise Refusal("nul", "the path carries %00")
        unescaped = False
        if _ESCAPED_SLASH.search(path):
            action = policy.escaped_slashes
            if action == "REJECT_REQUEST":
                raise Refusal("escaped_slash", f"the path {path[:64]!r} carries an "
                                                   "escaped slash (%2F or %5C)")
            if action != "KEEP_UNCHANGED":
                path = _ESCAPED_SLASH.sub(_unescape_slash, path)
                unescaped = True
    else:
        unescaped = False
    if policy.mode == "NONE":
        return path, unescaped
    if "%" in path:
        path = _ESCAPE.sub(_decode_unreserved, path)
    if "\\" in path:
        path = path.replace("\\", "/")
    if policy.mode != "BASE" and "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        path = remove_dot_segments(path)
    return path, unescaped


def normalize(target: str, policy: TargetPolicy) -> Normalized:
    """A validated target (see check_target) normalized: see the module docstring."""
    path, mark, query = target.partition("?")
    if "%" not in path and "\\" not in path and "//" not in path and "/." not in path:
        return Normalized(target, path)  # nearly every request: nothing to do
    normalized, unescaped = normalize_path(path, policy)
    redirect = unescaped and policy.escaped_slashes == "UNESCAPE_AND_REDIRECT"
    return Normalized(normalized + mark + query, normalized, redirect)


def normalize_authority(authority: str) -> str:
    """The Host / :authority policies match and the upstream gets: the host's trailing
    dot dropped (``web.shop.`` is ``web.shop``, as nginx and DNS read it), the rest as
    sent (policies compare hosts case-insensitively)."""
    if authority.startswith("["):  # an IP literal: nothing to drop
        return authority
    host, colon, port = authority.partition(":")  # check_authority: one colon at most
    if host.endswith(".") and host.strip("."):
        return host.rstrip(".") + colon + port
    return authority


def path_of(target: str) -> str:
    """The path part of a target, what routes and policies match (no query string)."""
    cut = target.find("?")
    return target if cut == -1 else target[:cut]
