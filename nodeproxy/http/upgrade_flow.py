"""An HTTP/1.1 upgrade carried out (upgrade.py decides which are allowed).

An allowed upgrade request is authorized like any request (router.Router.choose) and
sent to one endpoint on a connection of its own; nothing else goes upstream until that
endpoint answers it with a 101 naming the offered protocol.  Then the request is
recorded (status 101) and both connections become one new L4 flow (Istio's TCP series,
and an access-log line when it ends), the client's early bytes first.  Any other answer
goes back as an ordinary response and the client connection closes, its early bytes
unread; a 101 naming another protocol is an upstream protocol error (502, UPE).  An
``Upgrade: h2c`` request is forwarded as an ordinary request without its upgrade.

The relay joins the connection tracker for as long as it runs, with its source pod (reset
when that pod goes, and at drain) and with what its request was admitted as: when the
mesh state changes it is judged again as that request (daemon/revocation.py), so a
policy that now denies it resets it instead of leaving a WebSocket opened before the
policy to run for as long as its client keeps it.  (The client connection it came from
stays tracked beside it until it ends: the tracker's count has both.)
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from nodeproxy.codec.h1 import H1Client, H1Exchange
from nodeproxy.codec.message import Body, Exchange, RequestHead, UpstreamError
from nodeproxy.codec.upgrade import (
    NOT_SWITCHED,
    WITH_BODY,
    WRONG_PROTOCOL,
    Verdict,
    completes,
    decide_upgrade,
)
from nodeproxy.config.model import HttpSettings
from nodeproxy.http.authorize import RequestAuthorizer
from nodeproxy.http.context import Outcome, RequestContext
from nodeproxy.http.local_reply import local_reply
from nodeproxy.http.recorder import Recorder
from nodeproxy.http.router import Router, stream_response
from nodeproxy.http.routes import CompiledRule, apply_modifier
from nodeproxy.mesh.upstream import Refused, Upstreams
from nodeproxy.policy.admission import AdmittedRequest
from nodeproxy.tcp.relay import Relay, Side, reset
from nodeproxy.tcp.tracker import ConnectionTracker
from nodeproxy.telemetry.labels import UNKNOWN, TcpLabels
from nodeproxy.telemetry.proxy_metrics import ConnectionMeter, ProxyMetrics
from nodeproxy.telemetry.request_metrics import RequestMetrics, wire_protocol

UPGRADE_REFUSED = "upgrade not allowed"


@dataclass(frozen=True)
class Tunnel:
    """An upgrade the upstream accepted (101): both connections, taken out of HTTP, and
    the bytes each side sent after its head (the client's held since its request)."""

    token: str
    security: str  # connection_security_policy of the upstream connection
    down_transport: asyncio.Transport
    down_rest: bytes
    up_transport: asyncio.Transport
    up_rest: bytes
    admitted: AdmittedRequest | None  # what authorization judged (None: outside the mesh)


class Upgrades:
    def __init__(self, *, router: Router, authorizer: RequestAuthorizer,
                 upstreams: Upstreams, metrics: RequestMetrics, recorder: Recorder,
                 tcp_metrics: ProxyMetrics | None, tracker: ConnectionTracker):
        self._router = router
        self._authorizer = authorizer
        self._tracker = tracker
        self._upstreams = upstreams
        self._metrics = metrics
        self._recorder = recorder
        self._tcp_metrics = tcp_metrics  # upgraded connections are counted as TCP flows
        self._allowed = HttpSettings().allowed_upgrades

    def update(self, settings: HttpSettings) -> None:
        self._allowed = settings.allowed_upgrades

    async def refuse(self, exchange: Exchange, outcome: Outcome, reason: str,
                     status: int = 403) -> None:
        """An upgrade (or CONNECT) not made: 403 (400 for one with a body), counted."""
        self._metrics.count_upgrade_refusal(wire_protocol(exchange.request), reason)
        await local_reply(exchange, outcome, status,
                          UPGRADE_REFUSED if status == 403 else "bad request")

    async def start(self, ctx: RequestContext, exchange: H1Exchange, rule: CompiledRule,
                    outcome: Outcome) -> Tunnel | None:
        """An HTTP/1.1 upgrade request (see the module docstring).  Returns the tunnel to
        relay once the request is recorded, or None when it was answered otherwise."""
        head = exchange.request
        decision = decide_upgrade(head.header("upgrade"), self._allowed)
        if decision.verdict is Verdict.REFUSE:
            await self.refuse(exchange, outcome, decision.reason)
            return None
        if exchange.declares_body:
            # Where a body ends and the new protocol begins is where requests hide.
            await self.refuse(exchange, outcome, WITH_BODY, 400)
            return None
        if decision.verdict is Verdict.PLAIN:  # h2c: an ordinary request, then close
            # (Upgrade is hop-by-hop: never forwarded; HTTP2-Settings goes with it.)
            head.headers = [(n, v) for n, v in head.headers if n != "http2-settings"]
            self._metrics.count_upgrade_refusal(wire_protocol(head), decision.reason)
            await self._router.forward(ctx, exchange, rule, outcome)
            return None
        outcome.attempts = 1
        chosen = await self._router.choose(ctx, exchange, rule, outcome)
        if chosen is None:
            return None
        cluster, endpoint = chosen
        client = H1Client()
        try:
            opened = await self._upstreams.open(ctx.pod, endpoint.backend, cluster.entry.fqdn,
                                                client, l7_checked=True)
        except Refused:
            outcome.flags.append("UF")
            await local_reply(exchange, outcome, 503)
            return None
        upstream_head = RequestHead(head.method, head.path, head.authority,
                                    apply_modifier(head.headers, rule.request_headers))
        try:
            async with asyncio.timeout(rule.timeouts.request_seconds or None):
                response = await client.send(upstream_head, Body.empty(),
                                             upgrade=decision.token)
        except TimeoutError:
            client.abort()
            outcome.flags.append("UT")
            await local_reply(exchange, outcome, 504, "upstream request timeout")
            return None
        except UpstreamError as e:
            client.abort()
            outcome.flags.append(e.flag)
            await local_reply(exchange, outcome, 503,
                              "upstream connect error or disconnect/reset before "
                              "headers. reset reason: connection termination")
            return None
        except asyncio.CancelledError:
            client.abort()
            raise
        if response.head.status != 101:
            # Declined: an ordinary response; the client connection closes after it.
            self._metrics.count_upgrade_refusal(wire_protocol(head), NOT_SWITCHED)
            try:
                await stream_response(exchange, rule.response_headers, response, client, outcome)
            finally:
                client.close()
            return None
        if not completes(decision.token, client.upgraded_to):
            self._metrics.count_upgrade_refusal(wire_protocol(head), WRONG_PROTOCOL)
            client.abort()
            outcome.flags.append("UPE")
            await local_reply(exchange, outcome, 502, "upstream protocol error")
            return None
        up_transport, up_rest = client.detach()
        if exchange.client_gone or up_transport.is_closing():
            reset(up_transport)
            outcome.flags.append("DC" if exchange.client_gone else "UC")
            outcome.status = 101
            exchange.reset()
            return None
        down_transport, down_rest = exchange.take_over()
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        for name, value in apply_modifier(response.head.headers, rule.response_headers):
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        lines.append(b"upgrade: %s\r\nconnection: upgrade\r\n\r\n"
                     % (client.upgraded_to or decision.token).encode("latin-1"))
        switched = b"".join(lines)
        down_transport.write(switched)
        outcome.status = 101
        outcome.bytes_sent = len(switched)
        return Tunnel(decision.token, opened.security, down_transport, down_rest,
                      up_transport, up_rest,
                      self._authorizer.admitted_as(ctx, endpoint.backend, head))

    async def relay(self, ctx: RequestContext, exchange: H1Exchange, tunnel: Tunnel,
                    outcome: Outcome, request_id: str) -> None:
        """The byte stream after a 101: a new L4 flow, counted with Istio's TCP series and
        logged (one access-log line, protocol = the upgrade token) when it ends."""
        start, started_at = time.monotonic(), time.time()
        down = Side("downstream", start_paused=True)
        tunnel.down_transport.set_protocol(down)
        down.connection_made(tunnel.down_transport)
        up = Side("upstream", start_paused=True)
        tunnel.up_transport.set_protocol(up)
        up.connection_made(tunnel.up_transport)  # (an HBONE stream calls it too: no harm)
        if tunnel.down_rest:
            down.hold_early(tunnel.down_rest)  # held until the 101, relayed first
        if tunnel.up_rest:
            up.hold_early(tunnel.up_rest)
        dest = outcome.destination
        meter = None if self._tcp_metrics is None else ConnectionMeter(
            self._tcp_metrics, TcpLabels(
                reporter="source", source_workload=ctx.pod.ref.workload,
                source_workload_namespace=ctx.pod.workload.namespace,
                source_principal=ctx.pod.principal or UNKNOWN,
                destination_workload=dest.workload if dest else UNKNOWN,
                destination_workload_namespace=dest.namespace if dest else UNKNOWN,
                destination_principal=self._recorder.principal(dest),
                destination_service=outcome.service,
                connection_security_policy=tunnel.security))
        relay = Relay(down, up, meter.bytes if meter else (lambda _d, _n: None),
                      lambda _r: None)
        if meter is not None:
            meter.opened()
        self._tracker.add(relay, ctx.pod.key, admitted=tunnel.admitted)
        try:
            await relay.run()
        finally:
            self._tracker.discard(relay)
            if meter is not None:
                meter.closed()
            exchange.released()
            head = exchange.request
            flow = Outcome(flags=outcome.flags, attempts=outcome.attempts, status=101,
                           endpoint=outcome.endpoint, destination=dest,
                           service=outcome.service, bytes_sent=relay.bytes_from_upstream)
            self._recorder.log(ctx, head, flow, started_at, time.monotonic() - start,
                               relay.bytes_from_downstream, request_id, dest,
                               self._recorder.principal(dest), protocol=tunnel.token)
