"""What every fuzz target shares: an in-memory transport on a real event loop, the wire
checks the HTTP targets make, and the entry point that hands a target to atheris.

A target module defines ``check(data: bytes) -> None``: it feeds one input to the real
code and raises (AssertionError for a broken invariant, anything else for a crash) when
the code misbehaves.  ``check`` needs no atheris: the unit tests call it on the seed
corpus and on every crash input kept as a regression test.  ``python -m tests.fuzz.run``
(see run.py) instruments nodeproxy (and the pure-Python protocol libraries it drives)
and runs a target under libFuzzer.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any

# RFC 9110 5.6.2: token = 1*tchar
TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# What may never appear in a forwarded request target or header value.
CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
CONTROL_IN_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # HTAB is allowed in values


class MemoryTransport(asyncio.Transport):
    """A connected client socket in memory: records what the server writes, whether it
    paused reading, closed or aborted.  Only the transport API the codecs use is real."""

    def __init__(self, peer: tuple[str, int] = ("10.0.0.7", 40000)) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.reading_paused = False
        self._protocol: asyncio.BaseProtocol | None = None
        self._extra = {"peername": peer, "sockname": ("10.0.0.9", 8080)}

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._protocol is not None
        return self._protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "a write after close"
        self.written += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def is_reading(self) -> bool:
        return not self.reading_paused

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class Trouble(logging.Handler):
    """Collects what the code under test reports as its own failure: ERROR log records
    (a catch-all ``log.exception`` hides a bug from the caller, not from the fuzzer) and
    exceptions the event loop caught in callbacks and tasks."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))

    def loop_exception(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.records.append(f"{context.get('message')}: {exc!r}")

    def take(self) -> list[str]:
        records, self.records = self.records, []
        return records


TROUBLE = Trouble()

_LOOP: asyncio.AbstractEventLoop | None = None


def loop() -> asyncio.AbstractEventLoop:
    """One real event loop for a whole fuzzing run (a new one per input costs more than the
    input)."""
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
        _LOOP.set_exception_handler(TROUBLE.loop_exception)
    return _LOOP


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run one input's coroutine to its end on the shared loop; tasks it left behind are
    cancelled and awaited, so nothing leaks into the next input."""
    ev = loop()
    asyncio.set_event_loop(ev)
    TROUBLE.take()
    logger = logging.getLogger("nodeproxy")
    level = logger.level
    logger.addHandler(TROUBLE)
    logger.setLevel(logging.ERROR)  # info lines cost time and say nothing here
    try:
        ev.run_until_complete(coro_fn())
    finally:
        pending = [t for t in asyncio.all_tasks(ev) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            ev.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        logger.removeHandler(TROUBLE)
        logger.setLevel(level)
        asyncio.set_event_loop(None)
    trouble = TROUBLE.take()
    assert not trouble, "the code under test reported a failure of its own:\n" + "\n".join(
        trouble)


def close_loop() -> None:
    """Close the shared loop (a test process that replayed inputs in-process)."""
    global _LOOP
    if _LOOP is not None and not _LOOP.is_closed():
        _LOOP.close()
    _LOOP = None


async def settle(rounds: int = 40) -> None:
    """Let the loop run what the input set off (handlers, callbacks) without real time
    passing: a bounded number of loop turns."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def chunks(data: bytes) -> list[bytes]:
    """How one input is delivered: at once, or split into small reads, chosen from the
    input's length, so the same bytes are also seen arriving a piece at a time (at most
    64 pieces: a long input in 1-byte reads would cost more than it finds)."""
    size = (0, 1, 3, 7, 64)[len(data) % 5]
    if size == 0 or not data:
        return [data]
    size = max(size, -(-len(data) // 64))
    return [data[i:i + size] for i in range(0, len(data), size)]


async def feed(protocol: asyncio.Protocol, transport: MemoryTransport, data: bytes) -> None:
    """Connect `protocol` to `transport` and give it `data` in the fuzzer's chunks, letting
    the loop run between them, until the data ends or the protocol closes the transport
    (a paused transport is not read, as the event loop would not read it)."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    for piece in chunks(data):
        if transport.closed:
            break
        if not transport.reading_paused:
            protocol.data_received(piece)
        await settle(4)
    await settle()


def check_header_fields(headers: list[tuple[str, str]], hop_by_hop: frozenset[str], *,
                        allow: frozenset[str] = frozenset()) -> None:
    """Regular header fields as every codec must pass them on: lowercase token names, no
    hop-by-hop field (but those in `allow`), values without CR/LF/NUL or other controls,
    no Host (the head's authority carries it)."""
    for name, value in headers:
        assert TOKEN.match(name) and name == name.lower(), f"bad header name {name!r}"
        assert name not in hop_by_hop or name in allow, f"hop-by-hop header {name!r} passed on"
        assert name != "host", "a Host header passed on beside the authority"
        assert not CONTROL_IN_VALUE.search(value), f"control character in {name}: {value!r}"
    for singleton in ("content-length",):
        count = sum(1 for name, _ in headers if name == singleton)
        assert count <= 1, f"{singleton} passed on {count} times"


def check_origin_form(method: str, path: str) -> None:
    """A request target as forwarded: origin form (or ``*`` for OPTIONS), no whitespace or
    control characters."""
    assert TOKEN.match(method), f"method {method!r} is not a token"
    if method == "OPTIONS" and path == "*":
        return
    assert path.startswith("/"), f"path {path!r} is not in origin form"
    assert not CONTROL_OR_SPACE.search(path), f"whitespace or control character in {path!r}"
