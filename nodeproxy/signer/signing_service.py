"""The signing service (`nodeproxy ca serve`): HTTPS, one intermediate CA key, and the
Kubernetes API as the judge of who may hold which workload identity (policy.py).

API (JSON over HTTPS; the server certificate is signed by the intermediate for the
service's DNS names, so nodes verify it against the mesh root they already trust):

- ``POST /v1/sign`` with ``Authorization: Bearer <projected ServiceAccount token>`` and
  ``{"csr": "<PEM>", "ttlSeconds": N}``: ``200 {"certificateChain": [leaf, CA...],
  "trustBundle": root}``; a refusal is ``401`` (token) or ``403`` (anything else) or
  ``503`` (the Kubernetes API did not answer) with ``{"reason": ..., "message": ...}``.
  The leaf lives ``min(ttlSeconds, --max-ttl-seconds)`` and never past the intermediate.
- ``GET /metrics`` (Prometheus), ``GET /healthz``.

Every refusal is counted (``nodeproxy_ca_sign_refused_total{reason}``, reasons in
policy.REASONS) and logged with the caller, its node and the identity asked for; every
signature is counted (``nodeproxy_ca_signed_total``) and logged at info level.
"""

from __future__ import annotations

import json
import logging
import ssl

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from prometheus_client import CollectorRegistry, Counter, generate_latest

from nodeproxy.identity.csr import requested_identity
from nodeproxy.identity.mesh_ca import MeshCA
from nodeproxy.identity.spiffe import IdentityError
from nodeproxy.signer.kube import KubeApi, KubeError
from nodeproxy.signer.node_authorizer import SigningRefused, caller_of, check_may_hold, node_of

log = logging.getLogger(__name__)

DEFAULT_PORT = 15012  # Istio's CA port
DEFAULT_AUDIENCE = "nodeproxy-ca"
DEFAULT_MAX_TTL = 86400
MAX_BODY_BYTES = 64 * 1024
SERVER_CERT_TTL = 7 * 86400


class SignerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.signed = Counter("nodeproxy_ca_signed", "Workload certificates signed",
                              registry=registry)
        self.refused = Counter("nodeproxy_ca_sign_refused",
                               "Signing requests refused, by reason", ("reason",),
                               registry=registry)


class SigningService:
    def __init__(self, ca: MeshCA, kube: KubeApi, *, audience: str, node_agent: str,
                 max_ttl_seconds: float = DEFAULT_MAX_TTL,
                 registry: CollectorRegistry | None = None):
        self.ca = ca
        self.kube = kube
        self.audience = audience
        self.node_agent = node_agent
        self.max_ttl_seconds = max_ttl_seconds
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.metrics = SignerMetrics(self.registry)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/v1/sign", self._sign)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", lambda _r: self._healthz())
        return app

    async def _healthz(self) -> web.Response:
        return web.Response(text="ok\n")

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry),
                            content_type="text/plain", charset="utf-8")

    async def _sign(self, request: web.Request) -> web.Response:
        context: dict[str, str] = {"peer": str(request.remote)}
        try:
            chain = await self.sign(request, context)
        except SigningRefused as e:
            self.metrics.refused.labels(e.reason).inc()
            log.warning("signing refused (%s) for %s: %s", e.reason,
                        " ".join(f"{k}={v}" for k, v in context.items()), e)
            code = 401 if e.reason in ("no_token", "token_invalid", "wrong_audience") else \
                503 if e.reason == "kube_api_error" else 403
            return web.json_response({"reason": e.reason, "message": str(e)}, status=code)
        self.metrics.signed.inc()
        log.info("signed %s for node %s (caller pod %s)", context.get("identity"),
                 context.get("node"), context.get("caller"))
        return web.json_response({"certificateChain": chain,
                                  "trustBundle": self.ca.trust_anchor_pem.decode()})

    async def sign(self, request: web.Request, context: dict[str, str]) -> list[str]:
        authorization = request.headers.get("Authorization", "")
        if not authorization.startswith("Bearer ") or not authorization[7:].strip():
            raise SigningRefused("no_token", "no bearer token")
        try:
            body = await request.json()
            csr = body["csr"].encode("ascii")
            ttl = float(body.get("ttlSeconds") or self.max_ttl_seconds)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeError,
                json.JSONDecodeError) as e:
            raise SigningRefused("bad_request", f"want JSON {{csr, ttlSeconds}}: {e}") from None
        try:
            identity, public_key = requested_identity(csr, self.ca.trust_domain)
        except IdentityError as e:
            reason = e.reason if e.reason in ("bad_csr", "not_spiffe",
                                              "wrong_trust_domain") else "bad_csr"
            raise SigningRefused(reason, str(e)) from None
        context["identity"] = identity.uri
        try:
            review = await self.kube.token_review(authorization[7:].strip(), [self.audience])
            caller = caller_of(review, self.audience, self.node_agent)
            context["caller"] = f"{caller.pod_namespace}/{caller.pod_name}"
            node = node_of(caller, await self.kube.pod(caller.pod_namespace, caller.pod_name))
            context["node"] = node
            check_may_hold(identity, node, await self.kube.running_pods_on(node))
        except KubeError as e:
            raise SigningRefused("kube_api_error", str(e)) from None
        ttl = max(1.0, min(ttl, self.max_ttl_seconds))
        try:
            cert = self.ca.sign_public_key(identity, public_key, ttl)
        except IdentityError as e:
            raise SigningRefused("wrong_trust_domain", str(e)) from None
        leaf = cert.public_bytes(serialization.Encoding.PEM).decode()
        return [leaf, *(p.decode() for p in self.ca.chain_pems)]


def server_context(ca: MeshCA, dns_names: list[str]) -> ssl.SSLContext:
    """TLS 1.2+ server context presenting a certificate the intermediate signs for the
    service's DNS names (made at start, in memory)."""
    from nodeproxy.identity.tls import _memory_file

    chain, key = ca.server_certificate(dns_names, SERVER_CERT_TTL)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    with _memory_file(chain) as certfile, _memory_file(key) as keyfile:
        ctx.load_cert_chain(certfile, keyfile)
    return ctx


async def serve(service: SigningService, host: str, port: int, dns_names: list[str]
                ) -> web.AppRunner:
    runner = web.AppRunner(service.app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=server_context(service.ca, dns_names))
    await site.start()
    return runner
