"""The one decision point for connections into a local pod: peer authentication, then
authorization, on the verified identity.  Every decision is counted by policy; every
denial is logged with source identity, destination and policy.

Inbound plaintext (15006), HBONE streams (15008) and same-node mesh traffic all
ask here before the proxy connects to the application; nothing else decides.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from nodeproxy.config.model import NodeConfig, Workload
from nodeproxy.identity.spiffe import IdentityError, parse_spiffe_id
from nodeproxy.policy.authorization import Authorizer, ConnectionAttributes, DestinationWorkload
from nodeproxy.policy.peer_authentication import PeerAuthenticator

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Admission:
    allowed: bool
    policy: str  # deciding policy name, "" when none
    reason: str


class AdmissionMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.decisions = Counter(
            "nodeproxy_authorization_decisions",
            "Authorization decisions on connections into local pods, by policy and result",
            ("policy", "action", "result"), registry=registry)
        self.plaintext_refused = Counter(
            "nodeproxy_peer_authentication_refused",
            "Plaintext connections refused by STRICT peer authentication",
            ("destination_workload_namespace", "destination_workload"), registry=registry)


class Admitter:
    """Built from one config; replaced whole when the config changes."""

    def __init__(self, config: NodeConfig, metrics: AdmissionMetrics):
        self._authorizer = Authorizer(config)
        self._peer_auth = PeerAuthenticator(config)
        self._probe_sources = tuple(config.inbound.probe_sources)
        self._metrics = metrics

    @property
    def authorizer(self) -> Authorizer:
        return self._authorizer

    def admit(self, dest: Workload, source_principal: str | None, source_ip: IPAddress,
              port: int) -> Admission:
        """May this connection reach `dest` on `port`?  source_principal is the verified
        SPIFFE ID (mTLS or same-node netns identity), None for plaintext."""
        target = DestinationWorkload.of(dest)
        if source_principal is None and not self._peer_auth.accepts_plaintext(
                target, port, source_ip, self._probe_sources):
            self._metrics.plaintext_refused.labels(dest.namespace, dest.name).inc()
            log.warning("denied plaintext %s -> %s:%d: peer authentication STRICT",
                        source_ip, dest.key, port)
            return Admission(False, "", "plaintext refused (STRICT)")
        namespace = None
        if source_principal is not None:
            try:
                namespace = parse_spiffe_id(source_principal).namespace
            except IdentityError:
                namespace = None
        decision = self._authorizer.decide(target, ConnectionAttributes(
            source_principal=source_principal, source_namespace=namespace,
            source_ip=source_ip, destination_port=port))
        policy = decision.policy or ""
        self._metrics.decisions.labels(policy, decision.action,
                                       "allowed" if decision.allowed else "denied").inc()
        if not decision.allowed:
            log.warning("denied %s (%s) -> %s:%d by policy %s: %s",
                        source_principal or "plaintext", source_ip, dest.key, port,
                        policy or "-", decision.reason)
        return Admission(decision.allowed, policy, decision.reason)
