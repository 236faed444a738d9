"""Per-connection HTTP/2 budgets: what one peer may make the proxy do without a request
to show for it (CVE-2023-44487 "rapid reset"; CVE-2019-9512..9518: ping, settings,
empty-frame, reset and priority floods).

h2 enforces the protocol; a well-formed flood passes it.  A FrameGuard sees every frame a
server connection receives, before h2 acts on it, and is told when a stream's response
began and when a stream ended; past a budget ``frame`` raises an Abuse from inside h2's
frame loop (h2 parses nothing more of what was read), and the connection answers GOAWAY
ENHANCE_YOUR_CALM and closes.  The budgets are Envoy's answers to the same
CVEs, by the same names where it has one (config.model.Http2Limits):

- premature resets: streams the client reset before their response began or within
  ``premature_reset_lifetime_seconds``, and requests refused as malformed; too many once
  more than half the streams that ended were (judged from ``premature_reset_min_streams``
  streams on, before that at half of it);
- new streams per second (a token bucket of one second's worth);
- control frames (PING, SETTINGS, unknown types, GOAWAY, RST_STREAM of a stream not
  open): a token bucket, ``max_control_frames_per_second`` with a burst;
- PRIORITY frames: 10 plus ``max_priority_frames_per_stream`` per stream opened;
- WINDOW_UPDATE frames: 10 plus 2 per stream opened plus
  ``max_window_updates_per_data_frame`` per DATA frame sent;
- consecutive DATA frames with no payload and no END_STREAM;
- PING and SETTINGS (each needs an answer) received while writing is paused: the peer
  asks for answers it does not read.

Pure: no I/O; the clock is passed in (tests drive it).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import h2.errors
import h2.exceptions
from hyperframe.frame import (
    DataFrame,
    ExtensionFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from nodeproxy.config.model import Http2Limits

# Reasons, as nodeproxy_http2_abuse_total{reason} and nodeproxy_hbone_abuse_total{reason}
# label them.
PREMATURE_RESETS = "premature_resets"
MALFORMED_STREAMS = "malformed_streams"
STREAM_RATE = "stream_rate"
PING_FLOOD = "ping_flood"
SETTINGS_FLOOD = "settings_flood"
CONTROL_FLOOD = "control_flood"
PRIORITY_FLOOD = "priority_flood"
WINDOW_UPDATE_FLOOD = "window_update_flood"
EMPTY_FRAMES = "empty_frames"
UNREAD_CONTROL = "unread_control_frames"
# Streams whose start the guard remembers before pruning those h2 has closed: twice the
# concurrent streams a server allows (h2.MAX_CONCURRENT_STREAMS).
TRACKED_STREAMS = 2048

REASONS = (PREMATURE_RESETS, MALFORMED_STREAMS, STREAM_RATE, PING_FLOOD, SETTINGS_FLOOD,
           CONTROL_FLOOD, PRIORITY_FLOOD, WINDOW_UPDATE_FLOOD, EMPTY_FRAMES, UNREAD_CONTROL)


class Abuse(h2.exceptions.ProtocolError):
    """A budget was spent: the connection ends with GOAWAY ENHANCE_YOUR_CALM.  A
    ProtocolError, so raised from h2's frame handling it makes h2 queue that GOAWAY."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.error_code = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


class FrameBucket:
    """A token bucket that answers yes or no: ``rate`` tokens a second, at most ``capacity``
    saved up (full at the start).  A frame past its budget is never delayed, it ends the
    connection; the rate limits' bucket, which says how long to wait, is
    nodeproxy/tcp/token_bucket.py."""

    def __init__(self, rate: float, capacity: float, now: float):
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._last = now

    def take(self, now: float) -> bool:
        elapsed = now - self._last
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self._last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class FrameGuard:
    """The budgets of one server-side HTTP/2 connection (see the module docstring).

    ``is_open(stream_id)`` says whether a stream is one the connection still serves (an
    RST_STREAM for any other is a control frame, not a cancel).
    """

    def __init__(self, limits: Http2Limits, *, clock: Callable[[], float] = time.monotonic,
                 is_open: Callable[[int], bool] | None = None):
        self.limits = limits
        self._clock = clock
        self._is_open = is_open
        now = clock()
        self._stream_bucket = FrameBucket(limits.max_streams_per_second,
                                          limits.max_streams_per_second, now)
        self._control_bucket = FrameBucket(limits.max_control_frames_per_second,
                                           limits.control_frame_burst, now)
        self.highest_stream_id = 0
        self.streams_opened = 0
        self.streams_closed = 0
        self.premature_resets = 0
        self.data_frames_sent = 0
        self.priority_frames = 0
        self.window_updates = 0
        self.empty_run = 0  # consecutive DATA frames without payload or END_STREAM
        self.unread_control = 0  # answer-needing frames received while writes are paused
        self.writes_paused = False
        self._started: dict[int, float] = {}  # open streams: when their HEADERS came
        self._responded: set[int] = set()  # open streams whose response head went out

    # -- what the connection tells the guard -------------------------------------------------

    def frame(self, frame: Frame) -> None:
        """A frame arrived (before h2 handles it); raises Abuse past a budget."""
        if isinstance(frame, DataFrame):
            self.data_frame(bool(frame.data or frame.pad_length or "END_STREAM" in frame.flags))
            return
        self.empty_run = 0
        if isinstance(frame, HeadersFrame):
            self.headers(frame.stream_id)
        elif isinstance(frame, WindowUpdateFrame):
            self.window_update()
        elif isinstance(frame, PriorityFrame):
            self.priority_frames += 1
            allowed = 10 + self.limits.max_priority_frames_per_stream * self.streams_opened
            if self.priority_frames > allowed:
                raise Abuse(PRIORITY_FLOOD, f"{self.priority_frames} PRIORITY frames for "
                            f"{self.streams_opened} streams")
        elif isinstance(frame, PingFrame | SettingsFrame):
            reason = PING_FLOOD if isinstance(frame, PingFrame) else SETTINGS_FLOOD
            self._control(reason, type(frame).__name__)
            if "ACK" not in frame.flags and self.writes_paused:
                self.unread_control += 1
                if self.unread_control > self.limits.max_outbound_control_frames:
                    raise Abuse(UNREAD_CONTROL, f"{self.unread_control} PING/SETTINGS "
                                "frames while the answers to earlier ones went unread")
        elif isinstance(frame, RstStreamFrame):
            started = self._started.pop(frame.stream_id, None)
            if started is not None:
                responded = frame.stream_id in self._responded
                self._responded.discard(frame.stream_id)
                abuse = self.stream_closed(premature=self.is_premature(started, responded))
                if abuse is not None:
                    raise abuse
            elif self._is_open is None or not self._is_open(frame.stream_id):
                self._control(CONTROL_FLOOD, "RST_STREAM of a stream not open")
        elif isinstance(frame, ExtensionFrame | GoAwayFrame):
            self._control(CONTROL_FLOOD, type(frame).__name__)

    def headers(self, stream_id: int) -> None:
        """A HEADERS frame arrived on `stream_id`: a new stream if its id is odd and above
        every earlier one.  (``frame`` calls this; so does the connection for a request
        it takes without h2's parser, codec/h2_connection.py receive_known_request.)"""
        self.empty_run = 0
        if stream_id > self.highest_stream_id and stream_id % 2 == 1:
            self.highest_stream_id = stream_id
            self.streams_opened += 1
            now = self._clock()
            if len(self._started) >= TRACKED_STREAMS:
                self._prune()
            self._started[stream_id] = now
            if not self._stream_bucket.take(now):
                raise Abuse(STREAM_RATE, "more than "
                            f"{self.limits.max_streams_per_second} new streams a second")

    def data_frame(self, useful: bool) -> None:
        """A DATA frame arrived; ``useful``: it has a payload, padding or END_STREAM.  (The
        tunnel's own DATA framing calls this and window_update() for the frames it parses
        without h2; ``frame`` calls them for the rest.)"""
        if useful:
            self.empty_run = 0
            return
        self.empty_run += 1
        if self.empty_run > self.limits.max_consecutive_empty_frames:
            raise Abuse(EMPTY_FRAMES, f"{self.empty_run} empty DATA frames in a row")

    def window_update(self) -> None:
        """A WINDOW_UPDATE frame arrived."""
        self.empty_run = 0
        self.window_updates += 1
        allowed = (10 + 2 * self.streams_opened
                   + self.limits.max_window_updates_per_data_frame * self.data_frames_sent)
        if self.window_updates > allowed:
            raise Abuse(WINDOW_UPDATE_FLOOD, f"{self.window_updates} WINDOW_UPDATE "
                        f"frames for {self.data_frames_sent} DATA frames sent")

    def _prune(self) -> None:
        """Forget streams that ended without the server saying so (reset by h2 or by a
        check before any handler): only open ones stay, so the map stays bounded."""
        is_open = self._is_open
        keep = {sid: t for sid, t in self._started.items()
                if is_open is not None and is_open(sid)}
        if len(keep) >= TRACKED_STREAMS:  # no way to tell: keep the newest half
            keep = dict(list(keep.items())[TRACKED_STREAMS // 2:])
        self._started = keep
        self._responded &= keep.keys()

    def _control(self, reason: str, what: str) -> None:
        if not self._control_bucket.take(self._clock()):
            limits = self.limits
            raise Abuse(reason, f"{what}: more than {limits.control_frame_burst} control "
                        f"frames at once or {limits.max_control_frames_per_second} a second")

    def responded(self, stream_id: int) -> None:
        """The stream's response head went out: a reset from now on may be late."""
        if stream_id in self._started:
            self._responded.add(stream_id)

    def stream_ended(self, stream_id: int) -> None:
        """The server is done with a stream (answered, or reset by itself)."""
        if self._started.pop(stream_id, None) is not None:
            self._responded.discard(stream_id)
            self.stream_closed(premature=False)

    def stream_refused(self, stream_id: int) -> Abuse | None:
        """The server refused a malformed request (its stream reset, no handler): counted
        as a premature end, so malformed streams cannot be mixed with legitimate ones to
        dilute the premature-reset budget, nor flood the connection for free."""
        self._started.pop(stream_id, None)
        self._responded.discard(stream_id)
        return self.stream_closed(premature=True, reason=MALFORMED_STREAMS)

    def forget(self, stream_id: int) -> None:
        """A stream refused before any work (REFUSED_STREAM): not counted."""
        self._started.pop(stream_id, None)
        self._responded.discard(stream_id)

    def stream_closed(self, *, premature: bool,
                      reason: str = PREMATURE_RESETS) -> Abuse | None:
        """Count a stream's end (premature: the client reset it early, see the module
        docstring); an Abuse when premature resets are past their budget."""
        self.streams_closed += 1
        if not premature:
            return None
        self.premature_resets += 1
        judged = max(self.streams_closed, self.limits.premature_reset_min_streams)
        if 2 * self.premature_resets > judged:
            return Abuse(reason, f"{self.premature_resets} of {self.streams_closed} "
                         "streams reset early by the client or refused as malformed")
        return None

    def is_premature(self, started: float, responded: bool) -> bool:
        """Is a client reset of a stream that started at `started` (clock time) premature?"""
        return not responded or \
            self._clock() - started < self.limits.premature_reset_lifetime_seconds

    def now(self) -> float:
        return self._clock()

    def data_frame_sent(self) -> None:
        self.data_frames_sent += 1

    def paused(self) -> None:
        self.writes_paused = True

    def resumed(self) -> None:
        self.writes_paused = False
        self.unread_control = 0
