"""Kubernetes API reads: the pod-metadata hook of the CNI plugin, and the in-cluster GET.

The plugin takes a pod's service account and labels from its network
configuration (``args.cni``) or from CNI_ARGS.  Reading them from the API server
(pod, namespace labels such as ``nodeproxy.io/dataplane-mode``) is the
discovery work's: it plugs in by replacing ``LOOKUP_POD`` with a function that
returns the pod's metadata.  Until then the hook returns nothing and the
plugin's defaults apply (service account ``default``, no labels).

``get_json`` is the one in-cluster request nodeproxy makes without a client
library: GET with the pod's service-account token, checked against the
cluster CA.  ``nodeproxy uninstall --only-if-leaving`` uses it to read its own
namespace.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


@dataclass(frozen=True)
class PodMetadata:
    """What the API knows of a pod that the mesh needs."""

    service_account: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def no_lookup(namespace: str, name: str) -> PodMetadata | None:
    """The default hook: no API access from the plugin (see the module docstring)."""
    return None


# Replaced by the discovery work; called once per ADD with (namespace, name).
LOOKUP_POD: Callable[[str, str], PodMetadata | None] = no_lookup


class ApiUnavailable(RuntimeError):
    """Not running in a pod, or the API server could not be asked."""


def get_json(path: str, timeout: float = 5.0,
             sa_dir: str = SERVICE_ACCOUNT_DIR) -> dict[str, Any]:
    """GET https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT<path> as this pod."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise ApiUnavailable("KUBERNETES_SERVICE_HOST is not set: not running in a pod")
    try:
        with open(os.path.join(sa_dir, "token")) as f:
            token = f.read().strip()
    except OSError as e:
        raise ApiUnavailable(f"no service-account token: {e}") from e
    context = ssl.create_default_context(cafile=os.path.join(sa_dir, "ca.crt"))
    host = f"[{host}]" if ":" in host else host
    req = urllib.request.Request(f"https://{host}:{port}{path}",
                                 headers={"Authorization": f"Bearer {token}",
                                          "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as response:
            data: dict[str, Any] = json.load(response)
            return data
    except (OSError, ValueError) as e:
        raise ApiUnavailable(f"GET {path}: {e}") from e


def namespace_terminating(namespace: str,
                          get: Callable[[str], dict[str, Any]] | None = None) -> bool:
    """Whether the namespace is being deleted (its phase is Terminating)."""
    data = (get or get_json)(f"/api/v1/namespaces/{namespace}")
    return bool(data.get("metadata", {}).get("deletionTimestamp")) or \
        data.get("status", {}).get("phase") == "Terminating"
