"""Noticing that the node policy file changed.

A Kubernetes ConfigMap volume updates by swapping a symlink (`..data`), so neither the
file's name nor, reliably, its mtime tells; its content does.  The watcher re-reads the path
(following links) at an interval and reports when the bytes' digest differs from the
version in force.  SIGHUP asks for the same check at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def file_digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


async def watch(path: str, interval: float, current: Callable[[], str],
                changed: Callable[[], Awaitable[None]]) -> None:
    """Call `changed()` whenever the file's digest differs from `current()` (the digest of
    the version in force, or of the last version refused)."""
    while True:
        await asyncio.sleep(interval)
        digest = file_digest(path)
        if digest is not None and digest != current():
            await changed()
