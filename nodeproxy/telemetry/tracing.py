"""Request tracing: the daemon's holder of the active tracer, and its counters.

``Tracing.configure`` (every config) returns the active ``Tracer`` or None when
``tracing.enabled`` is false, so a request pays one None check when tracing is off and
the OpenTelemetry SDK (``nodeproxy.telemetry.request_spans``) is only imported once tracing is
enabled.  A changed ``tracing`` section makes a new ``Tracer``; the old one is shut
down on a thread of its own (it flushes what it queued), never on the event loop.
See ``nodeproxy.telemetry.request_spans`` for what a request's span does and how export is
bounded and counted.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from nodeproxy.telemetry.tracing_metrics import TracingMetrics

if TYPE_CHECKING:
    from nodeproxy.config.model import TracingSettings
    from nodeproxy.telemetry.request_spans import Tracer

log = logging.getLogger(__name__)

class Tracing:
    """The daemon's tracing across configurations (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry, node: str):
        self.metrics = TracingMetrics(registry)
        self._node = node
        self._tracer: Tracer | None = None
        self._settings: TracingSettings | None = None

    def configure(self, settings: TracingSettings) -> Tracer | None:
        """The tracer for this section: the running one if the section is unchanged."""
        if settings == self._settings:
            return self._tracer
        old, self._settings = self._tracer, settings
        self._tracer = None
        if settings.enabled:
            from nodeproxy.telemetry.request_spans import Tracer  # the SDK: only when used

            self._tracer = Tracer(settings, self.metrics, self._node)
        if old is not None:
            threading.Thread(target=old.shutdown, name="tracing-shutdown",
                             daemon=True).start()
        if self._tracer is not None:
            log.info("tracing: exporting %.4g%% of requests' spans to %s",
                     settings.sampling_percent, settings.endpoint)
        return self._tracer

    def close(self, wait_seconds: float = 2.0) -> None:
        """Stop exporting: queued spans are flushed for up to wait_seconds (the daemon is
        stopping; nothing else waits on the loop by then)."""
        tracer, self._tracer, self._settings = self._tracer, None, None
        if tracer is not None:
            thread = threading.Thread(target=tracer.shutdown, name="tracing-shutdown",
                                      daemon=True)
            thread.start()
            thread.join(wait_seconds)
