"""How a profiling tool reaches inside the daemons it starts: Python code every process
started meanwhile runs at interpreter start (a ``sitecustomize`` module first on
PYTHONPATH), told by one environment variable where to write.  The code starts with
DAEMON_CHECK and acts only where ``_nodeproxy_daemon()`` is true."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

# The first lines of every hook: whether this process is a nodeproxy daemon (`nodeproxy
# run`), read from its command line; other processes the tool starts ignore the hook.
DAEMON_CHECK = r'''
import os, signal
def _nodeproxy_daemon():
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"nodeproxy" in argv and b"run" in argv
'''


@contextlib.contextmanager
def startup_hook(directory: Path, code: str, variable: str, value: str) -> Iterator[None]:
    """Within the block, processes this one starts run ``code`` at start, with
    ``variable=value`` in their environment; PYTHONPATH and the variable are restored
    afterwards."""
    site = directory / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(code)
    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", variable)}
    os.environ[variable] = value
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(site), *filter(None, (saved["PYTHONPATH"] or "").split(os.pathsep))])
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
