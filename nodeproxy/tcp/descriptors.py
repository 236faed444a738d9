"""The daemon's file descriptors: how many it may open, and the share proxied traffic gets.

Every proxied connection holds descriptors (two for a relay, one more per pooled upstream
connection), and so do the things that must keep working when a pod floods the proxy:
the admin, metrics and readiness listeners and their connections, the control socket,
the BPF programs and maps, a reload's file reads.  So:

- at start the daemon raises its open-file limit (RLIMIT_NOFILE) to the hard limit, and
  tries to raise the hard limit itself to ``/proc/sys/fs/nr_open`` first.  That needs
  CAP_SYS_RESOURCE, which config/k8s/daemonset.yaml does not grant: there the daemon
  gets the container runtime's hard limit (commonly 1048576), plenty
  for a node; ``limits.openFiles`` sets the limit instead (tests, or an operator who
  wants less);
- proxied sockets never take the last ``limits.reservedFiles`` descriptors.

The budget is checked on the descriptor number itself.  Linux gives a new socket the
lowest free number, so a socket numbered N means every number below N is in use; a
proxied socket numbered at or above ``limit - reserved`` is closed at once (the
connection refused, counted).  Proxied sockets therefore always hold numbers below that
ceiling, at most ``limit - reserved`` of them, and the rest of the table stays free for
what is not proxied.  The check costs one comparison, with no count to keep in step.
"""

from __future__ import annotations

import logging
import resource
import socket
from dataclasses import dataclass

log = logging.getLogger(__name__)

NR_OPEN = "/proc/sys/fs/nr_open"


@dataclass(frozen=True)
class OpenFileLimit:
    """What the daemon found and set: soft and hard limits before and after."""

    soft_before: int
    hard_before: int
    soft: int
    hard: int
    nr_open: int | None
    note: str = ""  # why the limit is lower than asked, if it is


def _nr_open(path: str = NR_OPEN) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _finite(value: int) -> int:
    return 1 << 30 if value == resource.RLIM_INFINITY else value


def raise_open_file_limit(wanted: int | None) -> OpenFileLimit:
    """Set RLIMIT_NOFILE: to `wanted` if given, else as high as the kernel allows (the hard
    limit raised to fs.nr_open where the process may).  Never fails: what it could not do
    is said in ``note`` and the log."""
    soft0, hard0 = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = _nr_open()
    note = ""
    if wanted is None:
        target = nr_open if nr_open is not None else _finite(hard0)
    else:
        target = wanted
    hard = _finite(hard0)
    if target > hard:
        try:  # CAP_SYS_RESOURCE: raise the hard limit itself
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            hard = target
        except (ValueError, OSError) as e:
            note = f"could not raise the hard limit to {target} ({e}); using {hard}"
    soft = min(target, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ValueError, OSError) as e:
        note = f"could not set the open-file limit to {soft} ({e})"
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    result = OpenFileLimit(soft0, hard0, soft, _finite(hard), nr_open, note)
    log.info("open-file limit %d (hard %d; was %d/%d; fs.nr_open %s)%s", result.soft,
             result.hard, soft0, _finite(hard0), nr_open if nr_open is not None else "?",
             f": {note}" if note else "")
    return result


class DescriptorBudget:
    """The share of the descriptor table proxied sockets may use (see the module docstring).

    ``admits(fd)``: may a proxied socket numbered fd stay open?  ``headroom`` more
    descriptors are wanted by the same connection right after (an accepted connection
    still has its upstream to open), so the accept path asks with headroom 1.
    """

    def __init__(self, limit: int = 1 << 30, reserved: int = 0):
        self.configure(limit, reserved)

    def configure(self, limit: int, reserved: int) -> None:
        if reserved >= limit:
            raise ValueError(f"reserved descriptors ({reserved}) must be fewer than the "
                             f"open-file limit ({limit})")
        self.limit = limit
        self.reserved = reserved
        self.ceiling = limit - reserved  # proxied sockets hold numbers below this

    def admits(self, fd: int, headroom: int = 0) -> bool:
        return 0 <= fd and fd + headroom < self.ceiling

    def admits_socket(self, sock: socket.socket | None, headroom: int = 0) -> bool:
        if sock is None:
            return True
        fd = sock.fileno()
        return fd < 0 or self.admits(fd, headroom)


# One process, one descriptor table: the budget is process-wide.  The daemon configures it
# at start; until then (unit tests, tools) it admits everything.
BUDGET = DescriptorBudget()


class OverBudget(OSError):
    """A proxied socket would have taken a reserved descriptor."""

    reason = "descriptors"


def check_socket(sock: socket.socket) -> None:
    """Close `sock` and raise OverBudget if it took a reserved descriptor (upstream dials)."""
    if not BUDGET.admits_socket(sock):
        fd = sock.fileno()
        sock.close()
        raise OverBudget(f"descriptor {fd} is in the reserve (ceiling {BUDGET.ceiling})")
