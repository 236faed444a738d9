"""Who may hold which workload identity: the signing service's decisions, as pure
functions over what the Kubernetes API said (unit-tested without a cluster).

A node daemon authenticates with its projected ServiceAccount token.  The TokenReview
answer says whether the token is valid for this service's audience, whose it is (the
node agent's service account, nothing else may ask), and which pod it is bound to
(`authentication.kubernetes.io/pod-name` and `pod-uid` in `user.extra`: projected tokens
carry them).  That pod, read from the API and still the same object (uid), running, gives
the node.  A workload identity `ns/<ns>/sa/<sa>` is signed for that node only if a pod
with service account <sa> in namespace <ns> is running there now.  Istio's CA server
checks a ztunnel's CSRs the same way (its node authorizer); SPIRE attests the node first
and then the workload on it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from nodeproxy.identity.spiffe import SpiffeId

POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"

# nodeproxy_ca_sign_refused_total{reason}: a closed set.
REASONS = (
    "no_token",            # no bearer token on the request
    "token_invalid",       # TokenReview: not authenticated (forged, expired, revoked)
    "wrong_audience",      # the token is not for this service's audience
    "not_node_agent",      # a valid token, but not the node daemon's service account
    "no_bound_pod",        # the token is not bound to a pod (not a projected token)
    "caller_pod_gone",     # the bound pod no longer exists, or is another pod by that name
    "caller_pod_not_running",  # the bound pod is not running on a node
    "bad_request",         # not the JSON the API takes
    "bad_csr",             # the CSR is malformed or asks for more than one identity
    "not_spiffe",          # the CSR's name is not a workload SPIFFE ID
    "wrong_trust_domain",  # ... of this mesh's trust domain
    "no_such_pod_on_node",  # no running pod with that service account on the caller's node
    "kube_api_error",      # the Kubernetes API could not answer (the request may retry)
)


class SigningRefused(Exception):
    """A signing request refused; `reason` is one of REASONS, the message says why."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Caller:
    """The authenticated node daemon: its service account and the pod its token is
    bound to."""

    username: str
    pod_namespace: str
    pod_name: str
    pod_uid: str


def caller_of(review: Mapping[str, Any], audience: str, node_agent: str) -> Caller:
    """The caller a TokenReview's `status` describes; SigningRefused otherwise.  `node_agent` is
    the daemon's service account, `system:serviceaccount:<ns>:<name>`."""
    if not review.get("authenticated"):
        error = str(review.get("error") or "not authenticated")
        reason = "wrong_audience" if "audience" in error.lower() else "token_invalid"
        raise SigningRefused(reason, f"token refused by TokenReview: {error}")
    audiences = review.get("audiences")
    if audiences is not None and audience not in audiences:
        raise SigningRefused("wrong_audience",
                      f"token is for {audiences}, this service is {audience!r}")
    user = review.get("user") or {}
    username = str(user.get("username", ""))
    if username != node_agent:
        raise SigningRefused("not_node_agent",
                             f"{username or 'an unnamed user'} is not {node_agent}")
    extra = user.get("extra") or {}
    names, uids = extra.get(POD_NAME) or [], extra.get(POD_UID) or []
    if len(names) != 1 or len(uids) != 1:
        raise SigningRefused("no_bound_pod", "the token is not bound to a pod (use a projected "
                                      "ServiceAccount token)")
    namespace = username.split(":")[2]
    return Caller(username, namespace, str(names[0]), str(uids[0]))


def node_of(caller: Caller, pod: Mapping[str, Any] | None) -> str:
    """The node the caller's bound pod runs on; SigningRefused if that pod is gone, replaced
    (another uid under the same name) or not running on a node."""
    if pod is None or (pod.get("metadata") or {}).get("uid") != caller.pod_uid:
        raise SigningRefused("caller_pod_gone",
                      f"pod {caller.pod_namespace}/{caller.pod_name} ({caller.pod_uid}) "
                      "the token is bound to no longer exists")
    node = (pod.get("spec") or {}).get("nodeName")
    if not node or (pod.get("status") or {}).get("phase") != "Running" \
            or (pod.get("metadata") or {}).get("deletionTimestamp"):
        raise SigningRefused("caller_pod_not_running",
                      f"pod {caller.pod_namespace}/{caller.pod_name} is not running on a node")
    return str(node)


def running_on(pod: Mapping[str, Any], node: str) -> bool:
    return ((pod.get("spec") or {}).get("nodeName") == node
            and (pod.get("status") or {}).get("phase") == "Running"
            and not (pod.get("metadata") or {}).get("deletionTimestamp"))


def meshable(pod: Mapping[str, Any]) -> bool:
    """A host-network pod (the node daemon itself, kube-proxy...) has no network namespace
    of its own: it is never enrolled, so its service account earns no workload identity."""
    return not (pod.get("spec") or {}).get("hostNetwork")


def check_may_hold(identity: SpiffeId, node: str, pods: Iterable[Mapping[str, Any]]) -> str:
    """The name of a running pod on `node` with `identity`'s service account; SigningRefused
    ("no_such_pod_on_node") if there is none."""
    for pod in pods:
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        if meta.get("namespace") == identity.namespace and running_on(pod, node) and \
                meshable(pod) and \
                (spec.get("serviceAccountName") or "default") == identity.service_account:
            return str(meta.get("name"))
    raise SigningRefused("no_such_pod_on_node",
                  f"no running pod (of its own network) with service account {identity.namespace}/"
                  f"{identity.service_account} is scheduled on node {node}")
