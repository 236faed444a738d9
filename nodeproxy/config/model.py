"""The node policy model: typed, frozen, validated objects for one node YAML file.

YAML keys are camelCase (as in Kubernetes manifests); Python attributes are
snake_case.  Unknown keys are errors.  Everything structural is checked here;
facts about the running machine (does a netns path exist?) are checked by
nodeproxy.config.environment when the daemon applies a configuration.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from nodeproxy import ports

API_VERSION = "nodeproxy.io/v1alpha1"
KIND = "NodeProxyConfig"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_address(value: object) -> object:
    """Parse an IP address written as a string (pydantic alone would take 3 as 0.0.0.3)."""
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    if isinstance(value, str):
        try:
            return ipaddress.ip_address(value.strip())
        except ValueError:
            pass
    raise ValueError(f"{value!r} is not a valid IP address")


# An IPv4 or IPv6 address field: one clear error instead of one per union member.
IPField = Annotated[IPAddress, BeforeValidator(_ip_address)]
PortNumber = Annotated[int, Field(ge=1, le=65535)]
# A share of requests, in percent (Istio's Percent: fault injection, mirroring, sampling).
Percent = Annotated[float, Field(ge=0, le=100)]
# RFC 1123 label, as Kubernetes names and namespaces are.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_KEY = re.compile(r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class Model(BaseModel):
    """Base for every config object: frozen, strict about unknown keys, camelCase in YAML."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
    )


def _dns_label(value: str) -> str:
    if len(value) > 63 or not _DNS_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a valid name (lowercase letters, digits and '-', at most 63)"
        )
    return value


def _labels(value: dict[str, str]) -> dict[str, str]:
    for key in value:
        if not _LABEL_KEY.match(key):
            raise ValueError(f"{key!r} is not a valid label key")
    return value


class NodeSettings(Model):
    """Which node this daemon serves and where its kernel objects live."""

    name: str
    # cgroup v2 directory whose subtree holds this node's pods; the capture
    # programs attach here.  Default: the kubepods subtree of the cgroup v2 mount.
    pod_cgroup: str | None = None
    bpffs: str = "/sys/fs/bpf"
    # Where the daemon keeps what must survive a restart (pods enrolled at run time).
    state_dir: str = "/run/nodeproxy"

    _name = field_validator("name")(_dns_label)


class MeshSettings(Model):
    trust_domain: str = "cluster.local"
    # What to do with a destination that is neither a service VIP nor a known pod.
    outbound_policy: Literal["ALLOW_ANY", "REGISTRY_ONLY"] = "ALLOW_ANY"


class ProxySettings(Model):
    outbound_port: PortNumber = ports.OUTBOUND_PORT
    inbound_port: PortNumber = ports.INBOUND_PORT
    hbone_port: PortNumber = ports.HBONE_PORT
    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    # SIGTERM: stop accepting, wait this long for open connections, then close them.
    drain_seconds: float = Field(default=10.0, ge=0, le=3600)
    # How often enrolled pods' netns paths are checked for having vanished.
    netns_check_seconds: float = Field(default=1.0, gt=0, le=60)
    # How often the daemon looks whether a burst of connections is over, to give the
    # heap's freed memory back to the kernel (glibc malloc_trim); 0: never.
    memory_trim_seconds: float = Field(default=1.0, ge=0, le=3600)


class AdminSettings(Model):
    admin_address: str = "127.0.0.1"
    admin_port: PortNumber = ports.ADMIN_PORT
    metrics_address: str = "0.0.0.0"
    metrics_port: PortNumber = ports.METRICS_PORT
    readiness_port: PortNumber = ports.READINESS_PORT
    # Unix socket for runtime enroll/unenroll (the CNI plugin uses it).
    control_socket: str = "/run/nodeproxy/control.sock"
    # Seconds of per-workload and per-route figures kept in memory for `nodeproxy top` /
    # `nodeproxy stat` (GET /stats/live on the admin port); 0 keeps none.
    live_stats_seconds: int = Field(default=60, ge=0, le=600)


class CaptureSettings(Model):
    # How pods' traffic reaches the proxy.  ebpf: cgroup/connect4/6 rewrite each connect()
    # and sk_lookup steers inbound connections (no rule in the pod).  iptables: NAT
    # REDIRECT rules inside each enrolled pod's netns (nodeproxy.capture.iptables), for
    # kernels without those hooks; the original destination comes from SO_ORIGINAL_DST.
    mode: Literal["ebpf", "iptables"] = "ebpf"
    # What a crash leaves behind.  fail_closed keeps the capture programs
    # attached (pinned links) so pods' outbound traffic is refused until the
    # daemon restarts and takes over; fail_open detaches them with the
    # process, so pods talk directly, outside the mesh, until it returns.
    on_crash: Literal["fail_closed", "fail_open"] = "fail_closed"


class FastPathSettings(Model):
    """Kernel fast paths (docs/architecture.md, "Fast paths").

    splice: once the proxy has decided a plaintext flow (same-node pod to pod, the
    inbound plaintext path, a passthrough destination) and policy allows it, both of
    its sockets go into a sockhash with an sk_skb stream verdict program and the
    kernel moves the bytes; a workload's ``splice: false`` opts its flows out.  Off by
    default: opt in per node (docs/architecture.md says what was measured and found on
    kernel 6.18).  Switched off at reload, running flows are handed back to the proxy.
    sk_msg: the application's socket and the proxy's socket of one loopback
    connection (app <-> outbound listener) exchange messages through an sk_msg
    redirect instead of the loopback TCP/IP stack.  A reload applies a change to new
    connections; splice(2) reads of an application's socket do not see redirected bytes.
    splice_after_bytes: with splice on, a flow starts relayed by the proxy and is spliced
    once it has carried this many bytes (both directions together): the kernel's
    per-socket set-up and tear-down cost more than relaying a short or idle connection
    (docs/benchmarks.md, "Same-node connection set-up, ninth round").  0 splices every
    flow as soon as it is decided.
    """

    splice: bool = False
    splice_after_bytes: int = Field(default=65536, ge=0, le=1 << 40)
    sk_msg: bool = True


class PodShare(Model):
    """What one enrolled pod may hold of the node proxy, as a source (its outbound
    listener); docs/architecture.md, "Limits".  A pod over a cap is refused at once."""

    # Connections open at once, from accept until they end (Envoy's circuit-breaker
    # default is 1024 per cluster; a pod talks to many): 110 pods (kubelet's default
    # maxPods) x 4096 x 2 descriptors fit in fs.nr_open's default 1048576.
    max_connections: int = Field(default=4096, ge=1, le=1_000_000)
    # New connections per second, a token bucket refilled at this rate.
    connections_per_second: float = Field(default=250.0, gt=0, le=1_000_000)
    # The bucket's size; None: two seconds' worth of connectionsPerSecond.
    connection_burst: int | None = Field(default=None, ge=1, le=10_000_000)
    # HTTP requests in flight at once over all the pod's connections (503, flag OM);
    # Envoy's maxRequests / maxPendingRequests defaults.
    max_requests: int = Field(default=1024, ge=1, le=1_000_000)


class InboundShare(Model):
    """What one source outside this node may hold of the proxy's inbound side."""

    # HBONE streams open at once from one remote node (the peer address of its mTLS
    # connections): it carries the connections of every pod on that node.
    max_streams_per_node: int = Field(default=16384, ge=1, le=1_000_000)
    # Plaintext connections (15006) open at once from one client address.
    max_plaintext_per_source: int = Field(default=4096, ge=1, le=1_000_000)


class LimitSettings(Model):
    """The daemon's descriptors and each source's fair share (docs/architecture.md,
    "Limits")."""

    # RLIMIT_NOFILE set at start.  None: as high as the kernel allows (the hard limit,
    # raised to fs.nr_open first where the daemon may: a privileged DaemonSet can).
    open_files: int | None = Field(default=None, ge=256, le=1 << 30)
    # Descriptors proxied connections never take: admin, metrics, readiness, the control
    # socket, BPF programs and maps, reloads.
    reserved_files: int = Field(default=1024, ge=32, le=1 << 20)
    per_pod: PodShare = Field(default_factory=PodShare)
    inbound: InboundShare = Field(default_factory=InboundShare)
    # A relayed (opaque TCP) flow that moves no byte either way this long is closed, so a
    # silent connection never holds its descriptors for good (Envoy's tcp_proxy idle
    # timeout: 1 h).  Spliced flows are the kernel's and are not timed.
    tcp_idle_timeout_seconds: float = Field(default=3600.0, gt=0, le=7 * 86400)

    @model_validator(mode="after")
    def _reserve_fits(self) -> LimitSettings:
        if self.open_files is not None and self.reserved_files >= self.open_files // 2:
            raise ValueError(f"reservedFiles ({self.reserved_files}) must be less than half "
                             f"of openFiles ({self.open_files})")
        return self


class DiscoverySettings(Model):
    """Kubernetes API discovery: pods, services, endpointslices and namespaces."""

    kubernetes: bool = False
    # API server URL without authentication (`kubectl proxy`, tests); None: in-cluster
    # (service-account token and CA, KUBERNETES_SERVICE_HOST/PORT).
    api_server: str | None = None
    # Pods watched: "cluster" (remote endpoints get identities and labels) or "node".
    pods: Literal["cluster", "node"] = "cluster"


class RateLimit(Model):
    """A local token bucket (docs/http.md): it holds `burst` tokens, starts full and
    refills at requestsPerSecond; a request takes one token or is refused (429, flag RL).
    Over any T seconds at most burst + requestsPerSecond * T requests pass."""

    requests_per_second: float = Field(gt=0, le=1_000_000)
    # The bucket's size: requests that may pass at once after a quiet spell.
    # None: one second's worth (requestsPerSecond rounded up).
    burst: int | None = Field(default=None, ge=1, le=10_000_000)
    # True: a bucket per source identity (SPIFFE principal) instead of one shared.
    per_source_identity: bool = False


class Workload(Model):
    """A pod.  Local pods (on this node) need netns and cgroup; remote ones need only IPs."""

    name: str
    namespace: str = "default"
    service_account: str = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    node: str | None = None  # None: this node
    netns: str | None = None
    cgroup: str | None = None
    ips: list[IPField] = Field(min_length=1)
    # False: this workload's flows (as source or destination) are never spliced.
    splice: bool = True
    # True: one JSON access-log line per HTTP request this workload sends (http.accessLog).
    access_log: bool = False
    # Requests TO this workload, as this node's proxy routes them (docs/http.md).
    rate_limit: RateLimit | None = None

    _names = field_validator("name", "namespace", "service_account")(_dns_label)
    _label_keys = field_validator("labels")(_labels)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


AppProtocol = Literal["http", "http2", "grpc", "tcp"]


class ServicePort(Model):
    port: PortNumber
    target_port: PortNumber | None = None
    name: str | None = None
    protocol: Literal["tcp"] = "tcp"
    # What the port speaks, as Kubernetes' appProtocol says it: http (HTTP/1.1, with
    # HTTP/2 prior knowledge accepted too), http2, grpc, or tcp (opaque: never parsed).
    # None: detected from the client's first bytes (nodeproxy/codec/detect.py).
    app_protocol: AppProtocol | None = None

    @property
    def backend_port(self) -> int:
        return self.target_port or self.port


class ServiceEndpoint(Model):
    """An explicit service endpoint (a backend that is not a listed workload)."""

    address: IPField
    port: PortNumber
    node: str | None = None
    # Which of the service's ports this endpoint serves; omitted: every port.
    service_port: PortNumber | None = None


LoadBalancerPolicy = Literal["ROUND_ROBIN", "RANDOM", "LEAST_REQUEST", "PEAK_EWMA",
                             "RING_HASH"]


class LoadBalancer(Model):
    """How each request picks one of the service's endpoints (docs/http.md).

    PEAK_EWMA (Linkerd's default): power of two choices weighed by a peak-sensitive
    latency average times outstanding requests.  LEAST_REQUEST: power of two choices on
    outstanding requests (Envoy's).  RING_HASH: a consistent hash of one request header
    (hashHeader) or of the verified source identity (hashSourceIdentity).
    """

    policy: LoadBalancerPolicy = "PEAK_EWMA"
    hash_header: str | None = None
    hash_source_identity: bool = False

    @model_validator(mode="after")
    def _hash_key(self) -> LoadBalancer:
        keys = (self.hash_header is not None) + self.hash_source_identity
        if self.policy == "RING_HASH" and keys != 1:
            raise ValueError("RING_HASH needs exactly one of hashHeader, hashSourceIdentity")
        if self.policy != "RING_HASH" and keys:
            raise ValueError("hashHeader and hashSourceIdentity belong to policy RING_HASH")
        return self


class RetryBudgetSettings(Model):
    """Retries may add at most `ratio` of the requests of the last `windowSeconds`, plus
    `minRetriesPerSecond` (Linkerd's budget: 0.2, 10/s, 10 s), so retries cannot
    multiply an outage's load."""

    ratio: float = Field(default=0.2, ge=0, le=10)
    min_retries_per_second: float = Field(default=10.0, ge=0, le=100000)
    window_seconds: float = Field(default=10.0, gt=0, le=600)


class ConnectionPool(Model):
    """Circuit-breaker limits of one service, per node proxy, over all its client pods
    (Envoy's cluster thresholds and defaults; Istio's connectionPool).  A request past a
    limit fails fast: 503, flag UO (nodeproxy/http/circuit_breaker.py)."""

    max_connections: int = Field(default=1024, ge=1, le=1_000_000)
    max_pending_requests: int = Field(default=1024, ge=0, le=1_000_000)
    max_requests: int = Field(default=1024, ge=1, le=1_000_000)
    max_retries: int = Field(default=3, ge=0, le=1_000_000)


class OutlierDetection(Model):
    """Passive health checking of one service's endpoints (Envoy's consecutive-error
    ejection; Istio's outlierDetection field names).  A threshold of 0 turns that check
    off (nodeproxy/http/outlier.py)."""

    consecutive_5xx_errors: int = Field(default=5, ge=0, le=1_000_000,
                                        alias="consecutive5xxErrors")
    consecutive_gateway_errors: int = Field(default=5, ge=0, le=1_000_000)
    interval_seconds: float = Field(default=10.0, gt=0, le=3600)
    base_ejection_time_seconds: float = Field(default=30.0, gt=0, le=86400)
    max_ejection_percent: Percent = 10.0
    allow_last_healthy_ejection: bool = False


class TrafficPolicy(Model):
    """L7 settings of one service's upstream side (Istio's DestinationRule, in short)."""

    load_balancer: LoadBalancer = Field(default_factory=LoadBalancer)
    retry_budget: RetryBudgetSettings = Field(default_factory=RetryBudgetSettings)
    connection_pool: ConnectionPool = Field(default_factory=ConnectionPool)
    # None: no outlier detection (as in Envoy and Istio).
    outlier_detection: OutlierDetection | None = None
    # Pooled upstream connections idle this long are closed (Envoy's default: 1 h).
    idle_timeout_seconds: float = Field(default=3600.0, gt=0, le=86400)


class Service(Model):
    name: str
    namespace: str = "default"
    vips: list[IPField] = Field(min_length=1)
    ports: list[ServicePort] = Field(min_length=1)
    # Workloads whose labels contain all of these are endpoints (on target_port).
    selector: dict[str, str] | None = None
    # Extra endpoints, used as given.
    endpoints: list[ServiceEndpoint] = Field(default_factory=list)
    traffic_policy: TrafficPolicy = Field(default_factory=TrafficPolicy)

    _names = field_validator("name", "namespace")(_dns_label)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def endpoints_for(self, port: ServicePort) -> list[ServiceEndpoint]:
        """The explicit endpoints that serve this service port."""
        return [e for e in self.endpoints if e.service_port in (None, port.port)]

    @model_validator(mode="after")
    def _ports_unique(self) -> Service:
        seen: set[int] = set()
        for port in self.ports:
            if port.port in seen:
                raise ValueError(f"port {port.port} is listed twice")
            seen.add(port.port)
        if self.selector is None and not self.endpoints:
            raise ValueError("a service needs a selector or endpoints")
        return self


# --- identity, tunnel, inbound -------------------------------------------------------------

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _ip_network(value: object) -> object:
    """Parse "10.0.0.0/8", "fd00::/64" or a bare address (a /32 or /128); refuse host bits."""
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a valid IP address or CIDR")
    text = value.strip()
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        pass
    try:
        masked = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a valid IP address or CIDR") from None
    raise ValueError(f"{value!r} has host bits set (did you mean {masked}?)")


# An IP address or CIDR block; a bare address means just that address.
IPNetworkField = Annotated[IPNetwork, BeforeValidator(_ip_network)]


class SignerSettings(Model):
    """The mesh signing service (`nodeproxy ca serve`) a node that holds no CA key gets its
    workload certificates from (nodeproxy/signer/)."""

    address: str = Field(pattern=r"^https://[^/\s]+$")  # https://host:port
    # The DNS name in the service's certificate (default: the address's host).
    server_name: str | None = None
    # The node daemon's projected ServiceAccount token, bound to the signer's audience.
    token_path: str = "/var/run/secrets/nodeproxy/token"
    timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # After a failed signing (refused or unreachable): try again this often.
    retry_seconds: float = Field(default=2.0, gt=0, le=300)


class IdentitySettings(Model):
    """The mesh CA this node signs workload certificates with, or the signing service it
    asks (then caCert is only the trust anchor).  No caCert: mTLS is off."""

    ca_cert: str | None = None  # PEM root certificate
    ca_key: str | None = None  # PEM private key of that certificate
    signer: SignerSettings | None = None
    cert_ttl_seconds: int = Field(default=86400, gt=0)
    # A leaf certificate is renewed when this fraction of its lifetime has passed.
    rotate_at_fraction: float = Field(default=0.5, gt=0, lt=1)


class TunnelSettings(Model):
    """The HBONE connection pool: HTTP/2 CONNECT over mTLS to other nodes."""

    max_streams_per_connection: int = Field(default=100, ge=1)
    max_connections_per_key: int = Field(default=4, ge=1)
    idle_timeout_seconds: float = Field(default=60.0, gt=0, le=86400)
    keepalive_seconds: float = Field(default=10.0, gt=0, le=3600)
    handshake_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    # Believe the `x-nodeproxy-l7-authorized` marker a source node sets on a CONNECT: the
    # destination then skips judging that stream's HTTP requests itself.  Off: a node
    # that can present a mesh certificate could otherwise switch off this node's L7 rules
    # (docs/security.md, "A compromised node").
    trust_source_l7_authorization: bool = False


# inbound.probeSources entries at most: the slots of the kernel's probe_sources map
# (nodeproxy.capture.constants.MAX_PROBE_SOURCES; a unit test keeps the two equal).
MAX_PROBE_SOURCES = 256


# The probe addresses Istio ambient's CNI rewrites kubelet's probes to: link-local for
# IPv4; for IPv6 a unique-local address no pod range is carved from in practice.
PROBE_SNAT_IPV4 = ipaddress.IPv4Address("169.254.7.127")
PROBE_SNAT_IPV6 = ipaddress.IPv6Address("fd16:9254:7127:1337:ffff:ffff:ffff:ffff")
_LINK_LOCAL_V4 = ipaddress.IPv4Network("169.254.0.0/16")


class ProbeSnatSettings(Model):
    """Kubelet's probes from an address of their own (nodeproxy.capture.probe_snat): the
    node rewrites the source of the TCP connections its own processes open to enrolled
    pods to these addresses, which inbound capture then leaves alone.  Forwarded traffic
    (a NodePort connection masqueraded to the node's address) is not rewritten, so it
    is captured.  None for a family: its probes are not rewritten."""

    ipv4: ipaddress.IPv4Address | None = PROBE_SNAT_IPV4
    ipv6: ipaddress.IPv6Address | None = PROBE_SNAT_IPV6

    @field_validator("ipv4", mode="before")
    @classmethod
    def _link_local(cls, value: object) -> object:
        if value is None:
            return None
        parsed = _ip_address(value)
        if not isinstance(parsed, ipaddress.IPv4Address) or parsed not in _LINK_LOCAL_V4:
            raise ValueError(f"{value!r} is not an IPv4 link-local address (169.254.0.0/16):"
                             " the probe address must be one no pod or node owns")
        return parsed

    @field_validator("ipv6", mode="before")
    @classmethod
    def _unicast(cls, value: object) -> object:
        if value is None:
            return None
        parsed = _ip_address(value)
        if (not isinstance(parsed, ipaddress.IPv6Address) or parsed.is_multicast
                or parsed.is_loopback or parsed.is_unspecified or parsed.is_link_local
                or parsed.ipv4_mapped is not None):
            raise ValueError(f"{value!r} is not a unicast IPv6 address outside fe80::/10, "
                             "::1 and ::ffff:0:0/96")
        return parsed

    def addresses(self) -> list[IPAddress]:
        return [a for a in (self.ipv4, self.ipv6) if a is not None]


class InboundSettings(Model):
    # Sources of kubelet's probes (the node's own addresses): exempt from STRICT mTLS,
    # and in capture.mode ebpf or iptables not captured at all, so a probe reaches the
    # application itself (docs/architecture.md, "Inbound capture").
    probe_sources: list[IPNetworkField] = Field(default_factory=list,
                                                max_length=MAX_PROBE_SOURCES)
    # Rewrite the node's own connections to enrolled pods to a probe address, which is
    # then a probe source too (docs/security.md, "Probe sources are not captured").
    probe_snat: ProbeSnatSettings | None = None

    @model_validator(mode="after")
    def _room_for_probe_addresses(self) -> InboundSettings:
        if len(self.all_probe_sources()) > MAX_PROBE_SOURCES:
            raise ValueError(f"probeSources and probeSnat's addresses: at most "
                             f"{MAX_PROBE_SOURCES} together")
        return self

    def all_probe_sources(self) -> list[IPNetwork]:
        """What inbound capture and STRICT exempt: probeSources and the probe addresses."""
        snat = self.probe_snat.addresses() if self.probe_snat is not None else []
        return list(dict.fromkeys([*self.probe_sources,
                                   *(ipaddress.ip_network(a) for a in snat)]))


# --- peer authentication and authorization (Istio's shapes) --------------------------------

MtlsMode = Literal["UNSET", "STRICT", "PERMISSIVE", "DISABLE"]
SPIFFE_SCHEME = "spiffe://"


def _optional_dns_label(value: str | None) -> str | None:
    return None if value is None else _dns_label(value)


def _selector(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if not value:
        raise ValueError("must not be empty (omit it to select every workload in scope)")
    return _labels(value)


def _match_value(value: str) -> str:
    """An Istio string match: exact, "prefix*", "*suffix" or "*" (any non-empty value)."""
    body = value.removeprefix(SPIFFE_SCHEME)
    if not body:
        raise ValueError("must not be empty")
    if body == "*":
        return value
    inner = body[1:] if body.startswith("*") else body.removesuffix("*")
    if "*" in inner:
        raise ValueError(f"'*' is allowed only alone, at the start or at the end (got {value!r})")
    return value


def _port_string(value: object) -> object:
    """A port written as Istio writes it ("8080"); a YAML number is accepted too."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return value  # pydantic reports the wrong type
    text = value.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"must be a port number from 1 to 65535 (got {value!r})")
    return str(int(text))


_METHOD = re.compile(r"^[!#$%&'+.^_`|~0-9A-Z-]+$")


def _method(value: str) -> str:
    """An HTTP method token, matched exactly: upper-case, no wildcards (Istio's methods)."""
    if not _METHOD.match(value):
        hint = f" (did you mean {value.upper()!r}?)" if _METHOD.match(value.upper()) else ""
        raise ValueError(f"{value!r} is not an HTTP method: methods match exactly and are "
                         f"upper-case tokens such as 'GET'{hint}")
    return value


MatchValue = Annotated[str, AfterValidator(_match_value)]
PortString = Annotated[str, BeforeValidator(_port_string)]
MethodName = Annotated[str, AfterValidator(_method)]


class PeerAuthentication(Model):
    """Istio's PeerAuthentication: which inbound connections must be mTLS.

    No namespace: mesh-wide.  No selector: the whole namespace (or mesh).  A
    workload-selector policy beats a namespace-wide one, which beats a mesh-wide
    one; a port in portLevelMtls beats the policy's mode; UNSET inherits.
    """

    name: str
    namespace: str | None = None
    selector: dict[str, str] | None = None
    mode: MtlsMode = "UNSET"
    port_level_mtls: dict[PortNumber, MtlsMode] = Field(default_factory=dict)

    _name = field_validator("name")(_dns_label)
    _namespace = field_validator("namespace")(_optional_dns_label)
    _selector = field_validator("selector")(_selector)

    @property
    def key(self) -> str:
        return f"{self.namespace or '*'}/{self.name}"


class Source(Model):
    """Who connects.  Every field present must match; within a field any value does."""

    principals: list[MatchValue] | None = None
    not_principals: list[MatchValue] | None = None
    namespaces: list[MatchValue] | None = None
    not_namespaces: list[MatchValue] | None = None
    ip_blocks: list[IPNetworkField] | None = None
    not_ip_blocks: list[IPNetworkField] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Source:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError(
                "a source must set at least one of principals, notPrincipals, namespaces, "
                "notNamespaces, ipBlocks, notIpBlocks"
            )
        return self


class From(Model):
    source: Source


class Operation(Model):
    """What is requested.  Every field present must match; within a field any value does.

    ``ports`` apply to every connection; ``hosts``, ``methods`` and ``paths`` (and their
    ``not`` forms) are HTTP attributes, known only when the proxy sees the requests (see
    nodeproxy.policy.authorization for how a connection without HTTP is judged).  Hosts and
    paths are Istio string matches; methods are exact, case-sensitive method tokens.
    """

    hosts: list[MatchValue] | None = None
    not_hosts: list[MatchValue] | None = None
    ports: list[PortString] | None = None
    not_ports: list[PortString] | None = None
    methods: list[MethodName] | None = None
    not_methods: list[MethodName] | None = None
    paths: list[MatchValue] | None = None
    not_paths: list[MatchValue] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Operation:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError(
                "an operation must set at least one of hosts, notHosts, ports, notPorts, "
                "methods, notMethods, paths, notPaths"
            )
        return self

    @property
    def uses_l7(self) -> bool:
        return any((self.hosts, self.not_hosts, self.methods, self.not_methods, self.paths,
                    self.not_paths))


class To(Model):
    operation: Operation


def _non_empty_list(value: list[object] | None) -> list[object] | None:
    if value is not None and not value:
        raise ValueError("must not be empty (omit it to match anything)")
    return value


# `when` condition keys: the attribute a condition reads, and how its values are written.
CONDITION_KEYS = ("request.headers[<name>]", "source.ip", "source.namespace",
                  "source.principal", "destination.port")
_HEADER_KEY = re.compile(r"^request\.headers\[(.*)\]$")


def condition_header(key: str) -> str | None:
    """The (lowercase) header name of a ``request.headers[<name>]`` key, else None."""
    match = _HEADER_KEY.match(key)
    return match.group(1).lower() if match else None


def _condition_key(value: str) -> str:
    header = _HEADER_KEY.match(value)
    if header is not None:
        _header_name(header.group(1))  # raises with the header's name
        return value
    if value not in CONDITION_KEYS:
        raise ValueError(f"unknown condition key {value!r} (supported: "
                         f"{', '.join(CONDITION_KEYS)})")
    return value


def _condition_values(values: list[str] | None, key: str | None) -> list[str] | None:
    """Check each value the way the key reads it: CIDR, port or Istio string match."""
    if not values or key is None:
        return values
    if key == "source.ip":
        for value in values:
            _ip_network(value)
        return values
    if key == "destination.port":
        return [str(_port_string(value)) for value in values]
    return [_match_value(value) for value in values]


def _number_as_string(value: object) -> object:
    """A YAML number where a string is expected (destination.port values: [80])."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


ConditionValue = Annotated[str, BeforeValidator(_number_as_string)]


class Condition(Model):
    """One ``when`` entry: the attribute named by key must match one of values (if set) and
    none of notValues (if set).  source.ip values are addresses or CIDRs, destination.port
    values port numbers, the others Istio string matches."""

    key: str
    values: list[ConditionValue] | None = None
    not_values: list[ConditionValue] | None = None

    _key = field_validator("key")(_condition_key)

    @field_validator("values", "not_values")
    @classmethod
    def _values(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return _condition_values(value, info.data.get("key"))

    @model_validator(mode="after")
    def _not_empty(self) -> Condition:
        if not (self.values or self.not_values):
            raise ValueError("a condition must set values or notValues")
        return self

    @property
    def uses_l7(self) -> bool:
        return condition_header(self.key) is not None


class Rule(Model):
    """Matches if any `from` matches, any `to` matches and every `when` condition matches;
    an absent list matches anything."""

    from_: list[From] | None = Field(default=None, alias="from")
    to: list[To] | None = None
    when: list[Condition] | None = None

    _lists = field_validator("from_", "to", "when")(_non_empty_list)

    @property
    def uses_l7(self) -> bool:
        """True if matching needs an HTTP request: an L7 operation field or header condition."""
        return (any(t.operation.uses_l7 for t in self.to or ())
                or any(c.uses_l7 for c in self.when or ()))


class AuthorizationPolicy(Model):
    """Istio's AuthorizationPolicy: sources, ports, HTTP operations and conditions.

    No namespace: mesh-wide.  A selector narrows it to workloads whose labels
    contain it.  No rules: ALLOW matches nothing (so it denies everything it
    selects) and DENY matches nothing; ``rules: [{}]`` matches everything.
    """

    name: str
    namespace: str | None = None
    selector: dict[str, str] | None = None
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    rules: list[Rule] = Field(default_factory=list)

    _name = field_validator("name")(_dns_label)
    _namespace = field_validator("namespace")(_optional_dns_label)
    _selector = field_validator("selector")(_selector)

    @property
    def key(self) -> str:
        return f"{self.namespace or '*'}/{self.name}"


# --- L7: HTTP settings and routes (Gateway API HTTPRoute, GAMMA style) ---------------------

# Server-first or binary protocols whose ports are never sniffed (Istio's list plus memcached).
DEFAULT_OPAQUE_PORTS = [25, 587, 3306, 5432, 6379, 11211]
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE",
                "PATCH")
RetryOn = Literal[
    "connect-failure", "refused-stream", "reset", "5xx", "gateway-error",
    "retriable-status-codes",
    # gRPC status codes, read from grpc-status (Envoy's retry_on names)
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
]


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"invalid regular expression {value!r}: {e}") from None
    return value


def _header_name(value: str) -> str:
    if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value):
        raise ValueError(f"{value!r} is not a valid header name")
    return value.lower()


HeaderName = Annotated[str, AfterValidator(_header_name)]


class AccessLogSettings(Model):
    # Where JSON lines go ("-": the daemon's stdout).  Workloads opt in with accessLog.
    path: str = "-"
    # Lines waiting for the writer thread; past it lines are dropped and counted.
    queue_size: int = Field(default=10000, ge=1, le=10_000_000)


# An HTTP token (RFC 9110 5.6.2), optionally with a protocol version ("websocket", "foo/2").
_HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+(/[!#$%&'*+.^_`|~0-9A-Za-z-]+)?")
# Istio's meshConfig pathNormalization modes and Envoy's path_with_escaped_slashes_action
# (docs/http.md, "One request, one meaning"; nodeproxy/codec/request_target.py applies them).
PathNormalizationMode = Literal["NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]
EscapedSlashAction = Literal["KEEP_UNCHANGED", "REJECT_REQUEST", "UNESCAPE_AND_REDIRECT",
                             "UNESCAPE_AND_FORWARD"]


class Http2Limits(Model):
    """Per-connection budgets of an HTTP/2 client connection (and of an HBONE peer's
    connection), against floods that cost the proxy work without a request to show for it
    (CVE-2023-44487 "rapid reset", CVE-2019-9512..9518).  Past any budget the connection
    gets GOAWAY ENHANCE_YOUR_CALM and is closed (docs/http.md, "HTTP/2 abuse")."""

    # Resets by the client count as premature if the stream had no response head yet or
    # lived less than prematureResetLifetimeSeconds (Envoy's 1 s).  The connection is
    # closed once premature resets are at least half of the streams that ended, judged
    # from prematureResetMinStreams streams on (before that: at half of it), as Envoy does.
    premature_reset_min_streams: int = Field(default=500, ge=2, le=1_000_000)
    premature_reset_lifetime_seconds: float = Field(default=1.0, ge=0, le=3600)
    # New streams per second (a token bucket that holds one second's worth).
    max_streams_per_second: int = Field(default=5000, ge=1, le=1_000_000)
    # PING, SETTINGS and other frames that ask work but carry no request (unknown frame
    # types, RST_STREAM for streams not open): per second, and how many may come at once.
    max_control_frames_per_second: int = Field(default=100, ge=1, le=1_000_000)
    control_frame_burst: int = Field(default=1000, ge=1, le=1_000_000)
    # PRIORITY frames: 10 plus this many per stream opened (Envoy's default 100).
    max_priority_frames_per_stream: int = Field(default=100, ge=0, le=1_000_000)
    # WINDOW_UPDATE frames: 10 plus 2 per stream opened plus this many per DATA frame the
    # proxy sent (Envoy's default 10).
    max_window_updates_per_data_frame: int = Field(default=10, ge=1, le=1_000_000)
    # DATA frames in a row with no payload and no END_STREAM (Envoy's default 1).
    max_consecutive_empty_frames: int = Field(default=1, ge=0, le=1_000_000)
    # Frames that need an answer (PING, SETTINGS) received while the client does not read
    # the answers already queued (Envoy's maxOutboundControlFrames, 1000).
    max_outbound_control_frames: int = Field(default=1000, ge=1, le=1_000_000)
    # A pod one of whose connections was closed for abuse gets, for this long, a tenth of
    # the premature-reset and control-frame budgets on its new HTTP/2 connections (a
    # reconnecting attacker costs a tenth as much); 0: no penalty.
    abuse_penalty_seconds: float = Field(default=60.0, ge=0, le=86400)

    def penalized(self) -> Http2Limits:
        """The budgets of a pod under an abuse penalty: a tenth of the count-based ones."""
        return self.model_copy(update={
            "premature_reset_min_streams": max(2, self.premature_reset_min_streams // 10),
            "control_frame_burst": max(1, self.control_frame_burst // 10),
            "max_control_frames_per_second": max(1, self.max_control_frames_per_second // 10),
        })


class HttpSettings(Model):
    """Node-wide HTTP handling (docs/http.md)."""

    # How long an undeclared port waits for the client's first bytes before treating the
    # connection as opaque TCP.  Bytes from the server first end the wait at once.
    detection_timeout_seconds: float = Field(default=0.1, gt=0, le=10)
    # Ports never sniffed (server-first protocols): plain TCP unless declared.
    opaque_ports: list[PortNumber] = Field(default_factory=lambda: list(DEFAULT_OPAQUE_PORTS))
    # Largest request header block accepted (Envoy's default: 60 KiB); larger gets 431.
    max_header_bytes: int = Field(default=60 * 1024, ge=1024, le=1024 * 1024)
    # A client connection with no request in flight is closed after this (Envoy's 1 h).
    idle_timeout_seconds: float = Field(default=3600.0, gt=0, le=86400)
    # A request head (line and headers; an HTTP/2 header block) must arrive whole within
    # this many seconds of its first byte, and a new connection must send its first
    # request head within it; else 408 and close (HAProxy's `timeout http-request`).
    request_headers_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    # A whole request (head and body) must be received within this many seconds of its
    # head; else 408 (if nothing was answered yet) and close.  0: no limit.
    request_timeout_seconds: float = Field(default=300.0, ge=0, le=86400)
    # Request bodies up to this size are kept so a retry can resend them.
    retry_buffer_bytes: int = Field(default=64 * 1024, ge=0, le=16 * 1024 * 1024)
    # HTTP/1.1 Upgrade tokens the proxy lets through (Envoy's upgrade_configs; matched
    # case-insensitively).  Others get 403; h2c is never allowed (served as plain HTTP).
    allowed_upgrades: list[str] = Field(default_factory=lambda: ["websocket"])
    # How request paths are normalized before routing, authorization and forwarding.
    path_normalization: PathNormalizationMode = "MERGE_SLASHES"
    # What a path with %2F or %5C gets; None: the mode's choice (NONE: KEEP_UNCHANGED,
    # BASE and MERGE_SLASHES: REJECT_REQUEST, DECODE_AND_MERGE_SLASHES: UNESCAPE_AND_FORWARD).
    escaped_slashes_action: EscapedSlashAction | None = None
    access_log: AccessLogSettings = Field(default_factory=AccessLogSettings)
    # Budgets of each HTTP/2 connection (the L7 front end and the HBONE server).
    http2: Http2Limits = Field(default_factory=Http2Limits)

    @field_validator("allowed_upgrades")
    @classmethod
    def _upgrade_tokens(cls, value: list[str]) -> list[str]:
        for token in value:
            if not _HTTP_TOKEN.fullmatch(token):
                raise ValueError(f"{token!r} is not an HTTP token (RFC 9110 5.6.2)")
            if token.lower() == "h2c":
                raise ValueError("h2c cannot be allowed: HTTP/2 on an upgraded connection "
                                 "would carry requests the proxy never authorizes")
        lowered = [t.lower() for t in value]
        if len(set(lowered)) != len(lowered):
            raise ValueError("an upgrade token is listed twice")
        return value

    @model_validator(mode="after")
    def _escaped_slashes_fit_the_mode(self) -> HttpSettings:
        if self.path_normalization == "DECODE_AND_MERGE_SLASHES" and \
                self.escaped_slashes_action in ("KEEP_UNCHANGED", "REJECT_REQUEST"):
            raise ValueError(
                f"escapedSlashesAction {self.escaped_slashes_action} contradicts "
                "pathNormalization DECODE_AND_MERGE_SLASHES, which decodes escaped slashes "
                "(use MERGE_SLASHES with it, or UNESCAPE_AND_FORWARD / UNESCAPE_AND_REDIRECT)")
        return self

    @property
    def escaped_slashes_in_effect(self) -> EscapedSlashAction:
        if self.escaped_slashes_action is not None:
            return self.escaped_slashes_action
        return {"NONE": "KEEP_UNCHANGED", "DECODE_AND_MERGE_SLASHES": "UNESCAPE_AND_FORWARD"}.get(
            self.path_normalization, "REJECT_REQUEST")  # type: ignore[return-value]


def _otlp_http_url(value: str) -> str:
    """An OTLP/HTTP endpoint: http(s)://host[:port]/path, the host a name or an IP."""
    parsed = urllib.parse.urlsplit(value)
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port in (-1, 0) \
            or parsed.query or parsed.fragment or any(c.isspace() for c in value):
        raise ValueError(f"{value!r} is not an OTLP/HTTP URL "
                         f"(http://host:port/v1/traces)")
    return value


class TracingSettings(Model):
    """Spans of the proxy's HTTP requests, exported over OTLP/HTTP (docs/http.md)."""

    enabled: bool = False
    # The collector's OTLP/HTTP traces URL (protobuf); unreachable: failures are counted.
    endpoint: Annotated[str, AfterValidator(_otlp_http_url)] = \
        "http://127.0.0.1:4318/v1/traces"
    # Requests that arrive without a sampling decision and get a span (Istio's default 1%).
    sampling_percent: Percent = 1.0
    # Spans waiting for the exporter thread; past it new spans are dropped and counted.
    max_queue_size: int = Field(default=2048, ge=1, le=1_000_000)
    max_export_batch_size: int = Field(default=512, ge=1, le=100_000)
    # How long spans wait to be batched before an export (OTel's scheduledDelay).
    schedule_delay_seconds: float = Field(default=5.0, gt=0, le=300)
    # One export request to the collector, retries included.
    export_timeout_seconds: float = Field(default=5.0, gt=0, le=300)
    service_name: str = Field(default="nodeproxy", min_length=1)

    @field_validator("max_export_batch_size")
    @classmethod
    def _batch_fits_queue(cls, value: int, info: ValidationInfo) -> int:
        queue = info.data.get("max_queue_size")
        if queue is not None and value > queue:
            raise ValueError(f"must not exceed maxQueueSize ({queue})")
        return value


class PathMatch(Model):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: str = "/"

    @model_validator(mode="after")
    def _valid(self) -> PathMatch:
        if self.type == "RegularExpression":
            _regex(self.value)
        elif not self.value.startswith("/"):
            raise ValueError(f"a path must start with '/' (got {self.value!r})")
        return self


class ValueMatch(Model):
    """A header or query parameter match."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: str
    value: str

    @model_validator(mode="after")
    def _valid(self) -> ValueMatch:
        if self.type == "RegularExpression":
            _regex(self.value)
        return self


class HeaderMatch(ValueMatch):
    name: HeaderName


class RouteMatch(Model):
    """Every field present must match (Gateway API HTTPRouteMatch)."""

    path: PathMatch | None = None
    method: str | None = None
    headers: list[HeaderMatch] = Field(default_factory=list)
    query_params: list[ValueMatch] = Field(default_factory=list)

    @field_validator("method")
    @classmethod
    def _method(cls, value: str | None) -> str | None:
        if value is not None and value not in HTTP_METHODS:
            raise ValueError(f"unknown method {value!r} (one of {', '.join(HTTP_METHODS)})")
        return value


class BackendRef(Model):
    """A service the rule sends to (in the route's namespace unless given)."""

    name: str
    namespace: str | None = None
    port: PortNumber | None = None  # None: the port the request arrived on
    weight: int = Field(default=1, ge=0, le=1_000_000)

    _names = field_validator("name")(_dns_label)
    _namespace = field_validator("namespace")(_optional_dns_label)


class MirrorRef(Model):
    """The service a mirror copies requests to (in the route's namespace unless given)."""

    name: str
    namespace: str | None = None
    port: PortNumber | None = None  # None: the port the request arrived on

    _names = field_validator("name")(_dns_label)
    _namespace = field_validator("namespace")(_optional_dns_label)


class RequestMirror(Model):
    """Gateway API's RequestMirror filter (Istio: mirror + mirrorPercentage): a share of the
    rule's requests is copied to another service, fire and forget (docs/http.md)."""

    backend_ref: MirrorRef
    percentage: Percent = 100.0


class HttpHeader(Model):
    name: HeaderName
    value: str


class HeaderModifier(Model):
    """Gateway API's RequestHeaderModifier / ResponseHeaderModifier."""

    set: list[HttpHeader] = Field(default_factory=list)
    add: list[HttpHeader] = Field(default_factory=list)
    remove: list[HeaderName] = Field(default_factory=list)


class RetryBackoff(Model):
    """Exponential backoff with full jitter between attempts (Envoy: 25 ms, cap 10x)."""

    base_seconds: float = Field(default=0.025, gt=0, le=60)
    max_seconds: float = Field(default=0.25, gt=0, le=600)

    @model_validator(mode="after")
    def _order(self) -> RetryBackoff:
        if self.max_seconds < self.base_seconds:
            raise ValueError("maxSeconds must not be below baseSeconds")
        return self


class RetryPolicy(Model):
    """When a failed attempt is tried again (defaults: Istio's)."""

    attempts: int = Field(default=2, ge=0, le=100)  # retries after the first try
    retry_on: list[RetryOn] = Field(default_factory=lambda: [
        "connect-failure", "refused-stream", "unavailable", "cancelled",
        "retriable-status-codes"])
    status_codes: list[Annotated[int, Field(ge=100, le=599)]] = Field(
        default_factory=lambda: [503])
    per_try_timeout_seconds: float | None = Field(default=None, gt=0, le=86400)
    backoff: RetryBackoff = Field(default_factory=RetryBackoff)
    # POST, PATCH (and other non-idempotent methods) are retried only if this is set.
    non_idempotent: bool = False


class Timeouts(Model):
    # The whole exchange, every attempt and backoff included (Envoy's route default: 15 s).
    # 0 turns it off (streaming calls).
    request_seconds: float = Field(default=15.0, ge=0, le=86400)


GRPC_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
              "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
              "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
              "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


def _grpc_code(value: object) -> object:
    """A gRPC status: its number (0..16) or its name (UNAVAILABLE, ...)."""
    if isinstance(value, str) and not value.strip().isdigit():
        name = value.strip().upper()
        if name not in GRPC_CODES:
            raise ValueError(f"unknown gRPC status {value!r} (a number 0..16 or one of "
                             f"{', '.join(GRPC_CODES)})")
        return GRPC_CODES.index(name)
    return value


GrpcCode = Annotated[int, BeforeValidator(_grpc_code), Field(ge=0, le=16)]


class FaultDelay(Model):
    """Hold a share of requests for a fixed time before sending them on (flag DI)."""

    fixed_delay_seconds: float = Field(gt=0, le=3600)
    percentage: Percent = 100.0


class FaultAbort(Model):
    """Answer a share of requests at once, without sending them (flag FI): with
    httpStatus, or with grpcStatus (gRPC requests only)."""

    http_status: int | None = Field(default=None, ge=200, le=599)
    grpc_status: GrpcCode | None = None
    percentage: Percent = 100.0

    @model_validator(mode="after")
    def _one_status(self) -> FaultAbort:
        if (self.http_status is None) == (self.grpc_status is None):
            raise ValueError("an abort needs exactly one of httpStatus, grpcStatus")
        return self


class FaultInjection(Model):
    """Istio's HTTPFaultInjection on a rule: delay, then abort (a delayed request may also
    be aborted); with headers, only requests matching every one are eligible."""

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    headers: list[HeaderMatch] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something(self) -> FaultInjection:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs a delay, an abort or both")
        return self


class RouteRule(Model):
    # Any match may match; none listed matches every request (the route's default rule).
    matches: list[RouteMatch] = Field(default_factory=list)
    # Weighted split over services; none listed: the route's own service.
    backend_refs: list[BackendRef] = Field(default_factory=list)
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    # Copies of requests sent to shadow services; their responses are discarded.
    mirrors: list[RequestMirror] = Field(default_factory=list)
    # Requests matched by this rule, through this node's proxy (docs/http.md).
    rate_limit: RateLimit | None = None
    fault: FaultInjection | None = None

    @model_validator(mode="after")
    def _weights(self) -> RouteRule:
        if self.backend_refs and sum(b.weight for b in self.backend_refs) == 0:
            raise ValueError("the backendRefs' weights sum to 0: no request could be routed")
        return self


class HttpRoute(Model):
    """Gateway API HTTPRoute attached to a service (GAMMA): requests to that service's
    VIP are matched against its rules.  A service with routes answers a request no rule
    matches with 404 (response flag NR); a service without routes sends every request to
    its own endpoints with the default timeouts and retries."""

    name: str
    namespace: str = "default"
    service: str  # the parent service, in this namespace
    port: PortNumber | None = None  # one service port; None: all of them
    hostnames: list[str] = Field(default_factory=list)
    rules: list[RouteRule] = Field(min_length=1)

    _names = field_validator("name", "namespace", "service")(_dns_label)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class NodeConfig(Model):
    """One node's whole configuration."""

    api_version: Literal["nodeproxy.io/v1alpha1"]
    kind: Literal["NodeProxyConfig"]
    node: NodeSettings
    mesh: MeshSettings = Field(default_factory=MeshSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    capture: CaptureSettings = Field(default_factory=CaptureSettings)
    fast_path: FastPathSettings = Field(default_factory=FastPathSettings)
    discovery: DiscoverySettings = Field(default_factory=DiscoverySettings)
    workloads: list[Workload] = Field(default_factory=list)
    services: list[Service] = Field(default_factory=list)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    tunnel: TunnelSettings = Field(default_factory=TunnelSettings)
    inbound: InboundSettings = Field(default_factory=InboundSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    http_routes: list[HttpRoute] = Field(default_factory=list)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    peer_authentications: list[PeerAuthentication] = Field(default_factory=list)
    authorization_policies: list[AuthorizationPolicy] = Field(default_factory=list)

    def local_workloads(self) -> list[Workload]:
        return [w for w in self.workloads if w.node in (None, self.node.name)]


Problem = tuple[tuple[str | int, ...], str]
"""A validation problem: the field path in the YAML document and what is wrong."""


def cross_check(config: NodeConfig) -> list[Problem]:
    """Checks that span objects: duplicate names and addresses, local pods' netns and cgroup."""
    errors: list[Problem] = []
    workload_at: dict[str, int] = {}
    ip_at: dict[IPAddress, int] = {}
    for i, w in enumerate(config.workloads):
        if w.key in workload_at:
            errors.append((("workloads", i, "name"),
                           f"workload {w.key} is already defined at "
                           f"workloads[{workload_at[w.key]}]"))
        workload_at.setdefault(w.key, i)
        for j, ip in enumerate(w.ips):
            if ip in w.ips[:j]:
                errors.append((("workloads", i, "ips", j), f"IP {ip} is listed twice"))
            elif ip in ip_at and ip_at[ip] != i:
                errors.append((("workloads", i, "ips", j),
                               f"IP {ip} is already used by workloads[{ip_at[ip]}]"))
            ip_at.setdefault(ip, i)
        if w.node in (None, config.node.name):
            for needed in ("netns", "cgroup"):
                if not getattr(w, needed):
                    errors.append((("workloads", i),
                                   f"workload {w.key} is on this node, so it needs '{needed}'"))
    service_at: dict[str, int] = {}
    vip_at: dict[IPAddress, int] = {}
    for i, s in enumerate(config.services):
        if s.key in service_at:
            errors.append((("services", i, "name"),
                           f"service {s.key} is already defined at services[{service_at[s.key]}]"))
        service_at.setdefault(s.key, i)
        for j, vip in enumerate(s.vips):
            if vip in s.vips[:j]:
                errors.append((("services", i, "vips", j), f"VIP {vip} is listed twice"))
            elif vip in vip_at:
                errors.append((("services", i, "vips", j),
                               f"VIP {vip} is already used by services[{vip_at[vip]}]"))
            elif vip in ip_at:
                errors.append((("services", i, "vips", j),
                               f"VIP {vip} is also the IP of workloads[{ip_at[vip]}]"))
            vip_at.setdefault(vip, i)
    errors.extend(_route_problems(config))
    errors.extend(_capture_problems(config.capture))
    errors.extend(_identity_problems(config.identity))
    errors.extend(_peer_authentication_problems(config.peer_authentications))
    errors.extend(_strict_without_mtls(config))
    errors.extend(_duplicate_policy_names("authorizationPolicies", "authorization policy",
                                          config.authorization_policies))
    return errors


def _route_problems(config: NodeConfig) -> list[Problem]:
    """Routes name services and ports that exist; route names are unique per namespace."""
    errors: list[Problem] = []
    services = {s.key: s for s in config.services}
    first: dict[str, int] = {}
    for i, route in enumerate(config.http_routes):
        if route.key in first:
            errors.append((("httpRoutes", i, "name"),
                           f"HTTP route {route.key} is already defined at "
                           f"httpRoutes[{first[route.key]}]"))
        first.setdefault(route.key, i)
        parent = services.get(f"{route.namespace}/{route.service}")
        if parent is None:
            errors.append((("httpRoutes", i, "service"),
                           f"no service {route.namespace}/{route.service}"))
            continue
        if route.port is not None and route.port not in {p.port for p in parent.ports}:
            errors.append((("httpRoutes", i, "port"),
                           f"service {parent.key} has no port {route.port}"))
        for j, rule in enumerate(route.rules):
            for k, ref in enumerate(rule.backend_refs):
                target = services.get(f"{ref.namespace or route.namespace}/{ref.name}")
                where = ("httpRoutes", i, "rules", j, "backendRefs", k)
                if target is None:
                    errors.append(((*where, "name"),
                                   f"no service {ref.namespace or route.namespace}/{ref.name}"))
                elif ref.port is not None and ref.port not in {p.port for p in target.ports}:
                    errors.append(((*where, "port"),
                                   f"service {target.key} has no port {ref.port}"))
            for k, mirror in enumerate(rule.mirrors):
                ref = mirror.backend_ref
                target = services.get(f"{ref.namespace or route.namespace}/{ref.name}")
                where = ("httpRoutes", i, "rules", j, "mirrors", k, "backendRef")
                if target is None:
                    errors.append(((*where, "name"), f"no service to mirror to: "
                                   f"{ref.namespace or route.namespace}/{ref.name}"))
                elif ref.port is not None and ref.port not in {p.port for p in target.ports}:
                    errors.append(((*where, "port"),
                                   f"service {target.key} has no port {ref.port}"))
    return errors


def _capture_problems(capture: CaptureSettings) -> list[Problem]:
    """iptables rules live in the pods' network namespaces, not in the daemon: they outlive
    a crash, so that mode cannot fail open."""
    if capture.mode == "iptables" and capture.on_crash == "fail_open":
        return [(("capture", "onCrash"), "mode iptables always fails closed (its rules stay in "
                                         "the pods after a crash): use fail_closed")]
    return []


def _identity_problems(identity: IdentitySettings) -> list[Problem]:
    """caCert and caKey come as a pair: the node signs leaf certificates with the key;
    with a signer, caCert (the root to trust) and no key at all."""
    if identity.signer is not None:
        if identity.ca_key:
            return [(("identity", "caKey"), "a node with identity.signer holds no CA key: "
                                            "remove caKey")]
        if not identity.ca_cert:
            return [(("identity", "signer"), "identity.signer needs caCert (the mesh root "
                                             "the signer and peers are verified against)")]
        return []
    if identity.ca_cert and not identity.ca_key:
        return [(("identity", "caCert"), "caCert needs caKey (the node signs workload "
                                         "certificates with it)")]
    if identity.ca_key and not identity.ca_cert:
        return [(("identity", "caKey"), "caKey needs caCert")]
    return []


def _duplicate_policy_names(
    section: str, what: str, policies: Sequence[PeerAuthentication | AuthorizationPolicy]
) -> list[Problem]:
    """A policy name is unique within its namespace (mesh-wide policies are one scope)."""
    errors: list[Problem] = []
    first: dict[str, int] = {}
    for i, policy in enumerate(policies):
        if policy.key in first:
            scope = f"namespace {policy.namespace}" if policy.namespace else "the mesh-wide scope"
            errors.append(((section, i, "name"),
                           f"{what} {policy.name!r} is already defined in {scope} "
                           f"at {section}[{first[policy.key]}]"))
        first.setdefault(policy.key, i)
    return errors


def _strict_without_mtls(config: NodeConfig) -> list[Problem]:
    """STRICT refuses plaintext; with no CA every cross-node connection is plaintext."""
    if config.identity.ca_cert:
        return []
    errors: list[Problem] = []
    for i, policy in enumerate(config.peer_authentications):
        if policy.mode == "STRICT":
            errors.append((("peerAuthentications", i, "mode"),
                           "STRICT needs mTLS: set identity.caCert and identity.caKey"))
        for port, mode in policy.port_level_mtls.items():
            if mode == "STRICT":
                errors.append((("peerAuthentications", i, "portLevelMtls", port),
                               "STRICT needs mTLS: set identity.caCert and identity.caKey"))
    return errors


def _peer_authentication_problems(policies: list[PeerAuthentication]) -> list[Problem]:
    """Duplicate names, port-level modes without a selector, two policies for one scope."""
    errors = _duplicate_policy_names("peerAuthentications", "peer authentication", policies)
    scope_at: dict[str | None, int] = {}
    for i, policy in enumerate(policies):
        if policy.selector is not None:
            continue
        if policy.port_level_mtls:
            errors.append((("peerAuthentications", i, "portLevelMtls"),
                           "portLevelMtls requires a selector (as in Istio)"))
        if policy.namespace in scope_at:
            scope = (f"namespace {policy.namespace}" if policy.namespace else "the mesh")
            errors.append((("peerAuthentications", i),
                           f"{scope} already has a peer authentication without a selector "
                           f"at peerAuthentications[{scope_at[policy.namespace]}]"))
        scope_at.setdefault(policy.namespace, i)
    return errors
