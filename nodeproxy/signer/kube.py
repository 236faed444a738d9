"""The Kubernetes API calls of the signing service, over the documented REST protocol:

- ``POST /apis/authentication.k8s.io/v1/tokenreviews`` with ``spec.token`` and
  ``spec.audiences`` (the answer's ``status``: authenticated, user, audiences, error);
- ``GET /api/v1/namespaces/<ns>/pods/<name>`` (404: gone);
- ``GET /api/v1/pods?fieldSelector=spec.nodeName=<node>,status.phase=Running``.

RBAC it needs: create on tokenreviews (authentication.k8s.io), get/list on pods
(config/k8s/signer-rbac.yaml).  In a cluster it reads its own ServiceAccount token (again
for every call: the kubelet rotates it) and CA from the standard mount; in tests it is
pointed at the suite's stand-in API server (tests/integration/fake_kube_api.py).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TIMEOUT_SECONDS = 5.0


class KubeError(Exception):
    """The API could not answer (unreachable, 5xx, not JSON, refused our credentials)."""


class KubeApi:
    def __init__(self, base_url: str, *, token_file: str | None = None,
                 ca_file: str | None = None, timeout: float = TIMEOUT_SECONDS):
        self.base_url = base_url.rstrip("/")
        self._token_file = token_file
        self._ssl: ssl.SSLContext | bool = (ssl.create_default_context(cafile=ca_file)
                                            if ca_file else True)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def in_cluster(cls, sa_dir: str = SERVICE_ACCOUNT_DIR) -> KubeApi:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeError("not in a cluster (KUBERNETES_SERVICE_HOST is not set); "
                            "give --kube-api")
        if ":" in host:
            host = f"[{host}]"
        return cls(f"https://{host}:{port}", token_file=os.path.join(sa_dir, "token"),
                   ca_file=os.path.join(sa_dir, "ca.crt"))

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._token_file:
            try:
                token = Path(self._token_file).read_text().strip()
            except OSError as e:
                raise KubeError(f"cannot read {self._token_file}: {e}") from None
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def _call(self, method: str, path: str, body: Any = None,
                    params: dict[str, str] | None = None) -> tuple[int, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.request(method, self.base_url + path, json=body,
                                             params=params, headers=self._headers(),
                                             ssl=self._ssl) as response:
                if response.status >= 500 or response.status in (401, 403):
                    raise KubeError(f"{method} {path}: HTTP {response.status}")
                return response.status, await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise KubeError(f"{method} {path}: {e or type(e).__name__}") from None

    async def token_review(self, token: str, audiences: list[str]) -> dict[str, Any]:
        """The TokenReview's status for `token`, asked for `audiences`."""
        _status, answer = await self._call("POST",
                                           "/apis/authentication.k8s.io/v1/tokenreviews", {
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "spec": {"token": token, "audiences": audiences}})
        if not isinstance(answer, dict):
            raise KubeError("TokenReview answer is not an object")
        return dict(answer.get("status") or {})

    async def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        status, answer = await self._call(
            "GET", f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}")
        if status == 404:
            return None
        if status != 200 or not isinstance(answer, dict):
            raise KubeError(f"get pod {namespace}/{name}: HTTP {status}")
        return answer

    async def running_pods_on(self, node: str) -> list[dict[str, Any]]:
        status, answer = await self._call(
            "GET", "/api/v1/pods",
            params={"fieldSelector": f"spec.nodeName={node},status.phase=Running"})
        if status != 200 or not isinstance(answer, dict):
            raise KubeError(f"list pods on {node}: HTTP {status}")
        return [p for p in answer.get("items") or [] if isinstance(p, dict)]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
