"""Handing a decided flow to the kernel (sk_skb splice), and taking it back.

Once the proxy has admitted a plaintext flow whose both ends are sockets of this process
(same-node pod to pod, inbound plaintext, a passthrough destination), the relay's two
sockets can be spliced (bpf/splice.c): the kernel moves each one's incoming bytes to
the other's send queue and Python only watches for the ends of the flow.

The order of bytes and FINs holds because of three rules:
- splice only when nothing of the flow waits in Python (both write buffers empty), and
  make the kernel handle whatever already sits in the receive queues right away;
- forward a FIN only once the peer's send queue holds every byte the kernel moved to
  it (the verdict counts bytes per socket; tcp_info + SIOCOUTQ say what the peer's send
  queue has taken since the splice);
- take a flow back by pausing reads, stopping the verdict, waiting for the same
  condition both ways, and only then releasing the sockets and reading again.
Byte counts reach the relay's metrics from the verdict's per-socket counters.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from nodeproxy.capture.splice import SpliceMaps
from nodeproxy.proxy.relay import Relay, Side
from nodeproxy.proxy.tcpstate import is_closed, sent_total

log = logging.getLogger(__name__)

# A relay whose write buffers are not empty when it could be spliced is tried again
# this often, this many times, then left to Python.
RETRY_SECONDS = 0.005
RETRIES = 40
# Polling for the kernel to have delivered a direction's bytes: first wait, ceiling.
POLL_FIRST = 0.0002
POLL_MAX = 0.02
# How often half-closed spliced flows are checked for a reset on their quiet side.
WATCH_SECONDS = 0.5


class SpliceMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.flows = Counter(
            "nodeproxy_splice_flows",
            "Flows handed to the kernel (spliced), taken back, or that could not be spliced",
            ("event",), registry=registry)


@dataclass
class _End:
    side: Side
    sock: Any
    cookie: int
    sent_base: int  # sent_total() of this socket when the splice began


class SplicedFlow:
    """One relay whose bytes the kernel moves."""

    def __init__(self, splicer: Splicer, relay: Relay, pods: tuple[str, ...],
                 ends: tuple[_End, _End]):
        self.splicer = splicer
        self.relay = relay
        self.pods = pods
        self._ends = {id(end.side): end for end in ends}
        self._waiters: set[asyncio.Task] = set()
        self._released = False

    def _end(self, side: Side) -> _End:
        return self._ends[id(side)]

    def moved(self, src: Side) -> int:
        return self.splicer.maps.moved(self._end(src).cookie)

    def delivered(self, src: Side) -> bool:
        """Every byte the kernel moved from src is in the peer's send queue."""
        dst = self._end(self.relay.peer(src))
        try:
            taken = sent_total(dst.sock) - dst.sent_base
        except OSError:
            return True  # the peer's socket is gone: nothing left to wait for
        return taken >= self.moved(src)

    async def wait_delivered(self, src: Side) -> bool:
        """Wait until every byte moved from src is in the peer's send queue.  False when
        the peer's connection died first (it was reset): the relay is reset both ways."""
        delay = POLL_FIRST
        dst = self.relay.peer(src)
        while not self.relay.done.done() and not self.delivered(src):
            if self._reset(dst):
                self.relay.abort()
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX)
        return not self.relay.done.done()

    def _reset(self, side: Side) -> bool:
        """The side's connection is over in the kernel although the proxy never sent its
        FIN there: only a reset ends a TCP connection that way.  (A connection whose
        FINs both passed is over too, legitimately: the socket that sent the first FIN
        leaves TCP_CLOSE behind when it goes to TIME_WAIT.)"""
        return not self.relay.peer(side).eof_forwarded and is_closed(self._end(side).sock)

    def check_alive(self) -> None:
        """After a side's EOF nothing reads its socket any more, so a reset arriving
        there later would go unnoticed while the kernel moves bytes into it: ask the
        kernel, and pass the reset on."""
        if not self.relay.done.done() and any(
                self._reset(side) for side in (self.relay.downstream, self.relay.upstream)):
            self.relay.abort()

    def on_eof(self, src: Side) -> None:
        """src's peer closed its writing: pass the FIN on after src's bytes."""
        self._spawn(self._forward_eof(src))

    async def _forward_eof(self, src: Side) -> None:
        if await self.wait_delivered(src):
            self.relay.forward_eof(src)

    async def take_back(self) -> None:
        """Return the flow to Python without losing or reordering a byte."""
        if self._released:
            return
        sides = (self.relay.downstream, self.relay.upstream)
        for side in sides:
            side.pause()
        maps = self.splicer.maps
        maps.stop(*(end.cookie for end in self._ends.values()))
        await asyncio.gather(*(self.wait_delivered(side) for side in sides))
        self._release()
        self.relay.splice = None
        self.splicer.metrics.flows.labels("taken_back").inc()
        for side in sides:
            if not side.got_eof:
                side.resume()
        log.debug("took back %s", "/".join(self.pods))

    def finish(self) -> None:
        """The relay ended (both sockets closed): count the bytes, free the entries."""
        self._release()
        for task in self._waiters:
            task.cancel()

    def _release(self) -> None:
        if self._released:
            return
        self._released = True
        for end in self._ends.values():
            self.relay.account(end.side, self.splicer.maps.moved(end.cookie))
        self.splicer.maps.release(*(end.cookie for end in self._ends.values()))
        self.splicer.flows.discard(self)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)


class Splicer:
    """Decides which relays the kernel takes over and keeps track of them."""

    def __init__(self, maps: SpliceMaps, metrics: SpliceMetrics, enabled: bool):
        self.maps = maps
        self.metrics = metrics
        self.enabled = enabled
        self.flows: set[SplicedFlow] = set()
        self._watch: asyncio.TimerHandle | None = None

    def _watch_half_closed(self) -> None:
        """Every WATCH_SECONDS, look for resets on flows with one side half-closed."""
        self._watch = None
        for flow in list(self.flows):
            if flow.relay.downstream.got_eof or flow.relay.upstream.got_eof:
                flow.check_alive()
        if self.flows:
            self._watch = asyncio.get_running_loop().call_later(
                WATCH_SECONDS, self._watch_half_closed)

    def offer(self, relay: Relay, pods: Iterable[str], allowed: bool = True) -> None:
        """A relay has just started; splice it if splicing is on and the flow's
        workloads allow it (`allowed`), as soon as nothing of it waits in Python."""
        if not (self.enabled and allowed):
            return
        self._attempt(relay, tuple(pods), RETRIES)

    def _attempt(self, relay: Relay, pods: tuple[str, ...], retries: int) -> None:
        if relay.done.done() or relay.splice is not None or not self.enabled:
            return
        if not relay.idle():
            if retries > 0:
                asyncio.get_running_loop().call_later(
                    RETRY_SECONDS, self._attempt, relay, pods, retries - 1)
            else:
                self.metrics.flows.labels("busy").inc()
            return
        self._splice(relay, pods)

    def _splice(self, relay: Relay, pods: tuple[str, ...]) -> None:
        down, up = relay.downstream, relay.upstream
        assert down.transport is not None and up.transport is not None
        socks = [side.transport.get_extra_info("socket") for side in (down, up)]
        if any(s is None for s in socks):
            return  # not a socket (an HBONE stream): nothing for the kernel to join
        try:
            bases = [sent_total(s) for s in socks]
            cookies = self.maps.join(socks[0], socks[1])
        except OSError as e:
            log.warning("could not splice %s: %s", "/".join(pods) or "flow", e)
            self.metrics.flows.labels("failed").inc()
            return
        flow = SplicedFlow(self, relay, pods, (
            _End(down, socks[0], cookies[0], bases[0]),
            _End(up, socks[1], cookies[1], bases[1])))
        relay.splice = flow
        self.flows.add(flow)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(
                WATCH_SECONDS, self._watch_half_closed)
        self.metrics.flows.labels("spliced").inc()
        # Bytes that reached a receive queue before the verdict was attached wait for
        # the next data-ready event; setting SO_RCVLOWAT raises one now.
        for sock in socks:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass

    async def take_back(self, which: Callable[[SplicedFlow], bool] = lambda f: True) -> int:
        """Take back every spliced flow `which` selects; returns how many."""
        chosen = [flow for flow in list(self.flows) if which(flow)]
        await asyncio.gather(*(flow.take_back() for flow in chosen))
        return len(chosen)

