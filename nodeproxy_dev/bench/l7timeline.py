"""Where an L7 request's time goes inside the daemon: a start-up hook (daemon_hook.py)
that times, per HTTP/1.1 request, the daemon's own part and the upstream's.

Installed in the daemon by ``l7profile --timeline``.  Per request of a client connection:

- ``in``: from the loop handing the client's bytes to ``H1Server.data_received`` (the
  request's first bytes) to ``H1Client.send`` writing its head upstream;
- ``upstream``: from that write to the upstream's first response bytes reaching
  ``H1Client.data_received`` (the backend, the kernel between, and the loop's wake-up);
- ``out``: from there to ``H1Server.write`` of the response's bytes to the client;
- ``total``: from the request's first bytes to that write;
- ``in_cpu``, ``out_cpu``, ``total_cpu``: the event loop thread's CPU time over the same
  spans (the rest of the wall time it waited: for the CPU, or on other requests' work);
- ``gap``: between a connection's previous response write and its next request's first
  bytes (wrk's pause, for a paced load);
- ``burst``: how many other requests' first bytes arrived in the millisecond before this
  one's (a count, not microseconds): whether a paced client's connections fire together.

Each is kept as a list of microseconds (bounded, ``MAX_SAMPLES``) and written as JSON to
``$NODEPROXY_TIMELINE_DIR/timeline-<pid>.json`` on SIGUSR2.  The wrappers cost the daemon a
few microseconds per request: compare figures taken with the hook on, not against a run
without it.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from nodeproxy_dev.bench.daemon_hook import DAEMON_CHECK

VARIABLE = "NODEPROXY_TIMELINE_DIR"
MAX_SAMPLES = 200_000
PHASES = ("in", "in_cpu", "upstream", "out", "out_cpu", "total", "total_cpu", "gap", "burst")

SITECUSTOMIZE = DAEMON_CHECK + r'''
if os.environ.get("NODEPROXY_TIMELINE_DIR") and _nodeproxy_daemon():
    import json, time
    _clock = time.perf_counter
    _MAX = 200_000
    _cpu = time.thread_time
    _samples = {"in": [], "upstream": [], "out": [], "total": [], "gap": [],
                "in_cpu": [], "out_cpu": [], "total_cpu": [], "burst": []}
    from collections import deque
    _begins = deque(maxlen=64)
    def _keep(phase, seconds):
        bucket = _samples[phase]
        if len(bucket) < _MAX:
            bucket.append(round(seconds * 1e6, 1))
    def _dump(signum, frame):
        path = os.path.join(os.environ["NODEPROXY_TIMELINE_DIR"], f"timeline-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(_samples, f)
        for bucket in _samples.values():
            bucket.clear()
    signal.signal(signal.SIGUSR2, _dump)
    import asyncio
    from nodeproxy.codec import h1 as _h1
    _server, _client = _h1.H1Server, _h1.H1Client
    _received, _write = _server.data_received, _server.write
    _send, _upstream_received, _start = _client.send, _client.data_received, _server._start
    _owner = {}  # id(worker task) -> its H1Server
    def _data_received(self, data):
        now = _clock()
        if getattr(self, "_tl_begin", None) is None:
            self._tl_begin = now
            self._tl_begin_cpu = _cpu()
            while _begins and _begins[0] < now - 0.001:
                _begins.popleft()
            _samples["burst"].append(len(_begins)) if len(_samples["burst"]) < _MAX else None
            _begins.append(now)
            last = getattr(self, "_tl_written", None)
            if last is not None:
                _keep("gap", now - last)
        return _received(self, data)
    def _server_write(self, data):
        now = _clock()
        begin = getattr(self, "_tl_begin", None)
        if begin is not None:
            self._tl_begin = None
            self._tl_written = now
            cpu = _cpu()
            _keep("total", now - begin)
            _keep("total_cpu", cpu - self._tl_begin_cpu)
            answered = getattr(self, "_tl_answered", None)
            if answered is not None:
                self._tl_answered = None
                _keep("out", now - answered)
                _keep("out_cpu", cpu - self._tl_answered_cpu)
        return _write(self, data)
    def _server_start(self, exchange):
        result = _start(self, exchange)
        if self._worker is not None:
            _owner[id(self._worker)] = self
        return result
    def _client_send(self, head, body, **kw):
        now = _clock()
        task = asyncio.current_task()
        owner = _owner.get(id(task)) if task is not None else None
        begin = getattr(owner, "_tl_begin", None) if owner is not None else None
        if begin is not None:
            _keep("in", now - begin)
            _keep("in_cpu", _cpu() - owner._tl_begin_cpu)
        self._tl_sent = now
        self._tl_server = owner
        return _send(self, head, body, **kw)
    def _client_received(self, data):
        now = _clock()
        sent = getattr(self, "_tl_sent", None)
        if sent is not None:
            self._tl_sent = None
            _keep("upstream", now - sent)
            if self._tl_server is not None:
                self._tl_server._tl_answered = now
                self._tl_server._tl_answered_cpu = _cpu()
        return _upstream_received(self, data)
    _server.data_received = _data_received
    _server.write = _server_write
    _server._start = _server_start
    _client.send = _client_send
    _client.data_received = _client_received
'''


def summarize(path: Path) -> str:
    """Percentiles of each phase in one dump, in microseconds."""
    samples: dict[str, list[float]] = json.loads(path.read_text())
    lines = [f"{'phase':>9} {'n':>7} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>9} (us)"]
    for phase in PHASES:
        values = sorted(samples.get(phase, []))
        if len(values) < 2:
            continue
        q = statistics.quantiles(values, n=100, method="inclusive")
        lines.append(f"{phase:>9} {len(values):>7} {q[49]:>8.0f} {q[89]:>8.0f} {q[98]:>8.0f} "
                     f"{values[-1]:>9.0f}")
    return "\n".join(lines) + "\n"


CALLS_VARIABLE = "NODEPROXY_CALLS_DIR"

# ``l7profile --calls``: the event loop thread under cProfile between two SIGUSR2s (the
# first starts it, the second writes ``calls-<pid>.prof``, pstats' format): exact call
# counts per function, which the machine's load does not move.
CALLS_SITECUSTOMIZE = DAEMON_CHECK + r'''
if os.environ.get("NODEPROXY_CALLS_DIR") and _nodeproxy_daemon():
    import cProfile
    _profile = [None]
    def _toggle(signum, frame):
        if _profile[0] is None:
            _profile[0] = cProfile.Profile()
            _profile[0].enable()
            return
        profile, _profile[0] = _profile[0], None
        profile.disable()
        profile.dump_stats(os.path.join(os.environ["NODEPROXY_CALLS_DIR"],
                                        f"calls-{os.getpid()}.prof"))
    signal.signal(signal.SIGUSR2, _toggle)
'''


def calls_summary(path: Path, requests: int, top: int = 60) -> str:
    """Python function calls per request (cProfile's counts over `requests`), the most
    frequent first, with each one's own time per request under the profiler."""
    import pstats

    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = []
    total_calls = 0
    for (filename, line, name), (_cc, calls, own, _cum, _callers) in stats.items():
        total_calls += calls
        short = "/".join(filename.split("/")[-2:])
        rows.append((calls / requests, own / requests * 1e6, f"{name} ({short}:{line})"))
    rows.sort(key=lambda r: -r[0])
    lines = [f"function calls per request: {total_calls / requests:.1f} "
             f"({requests} requests)", f"{'calls':>7} {'own us':>7}  function"]
    lines += [f"{c:7.2f} {t:7.2f}  {name}" for c, t, name in rows[:top]]
    return "\n".join(lines) + "\n"
