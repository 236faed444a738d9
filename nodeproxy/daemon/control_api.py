"""The control socket's API (HTTP over a Unix socket, mode 0600): requests in, the typed
results and errors of the daemon's domain (nodeproxy.daemon.runtime_pods,
nodeproxy.daemon.handover) out as HTTP statuses and JSON.  This is the only place that
knows both.

- `GET /v1/pods`: 200 and every enrolled pod.
- `GET /v1/pods/{ns}/{name}`: 200 and the pod; 200 `{"skipped", "reason"}` for a pod the
  API says is not meshed; 404.
- `POST /v1/pods` (a pod in the node YAML's form): 200 `{"enrolled", "podId"}`,
  `{"registered", "node"}` (a pod on another node) or `{"skipped", "reason"}`; 400 for a
  body that is not JSON, an invalid pod (`problems` names each field) or a netns, cgroup
  or listener the kernel refused; 409 for a pod that conflicts with an enrolled one.
- `DELETE /v1/pods/{ns}/{name}`: 200 `{"unenrolled"}` (with `"wasSkipped": true` for a
  skipped pod) or `{"unregistered"}` (another node's pod); 404.
- `POST /v1/handover`: 200 `{"openConnections"}` (a new instance takes over: upgrade);
  409 when this instance is not running the node.

The CNI plugin and `nodeproxy enroll`/`unenroll` read these answers; they do not change.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from nodeproxy.admin.http_server import PathTable, Request, Response
from nodeproxy.daemon.handover import HandoverRefused
from nodeproxy.daemon.runtime_pods import (
    Enrolled,
    InvalidPod,
    NotEnrolled,
    PodSetupFailed,
    Registered,
    RuntimePods,
    Skipped,
    parse_workload,
)
from nodeproxy.pods.enrollment import EnrollError

OK, BAD_REQUEST, NOT_FOUND, CONFLICT = 200, 400, 404, 409



class ControlApi:
    def __init__(self, *, pods: Callable[[], list[dict[str, Any]]], runtime: RuntimePods,
                 hand_over: Callable[[], Awaitable[int]]):
        self._pods = pods  # the enrolled pods as GET /v1/pods shows them
        self._runtime = runtime
        self._hand_over = hand_over  # -> connections left to drain; HandoverRefused

    def app(self) -> PathTable:
        control = PathTable()
        control.add_get("/v1/pods", self._list)
        control.add_post("/v1/pods", self._enroll)
        control.add_delete("/v1/pods/{namespace}/{name}", self._unenroll)
        control.add_get("/v1/pods/{namespace}/{name}", self._pod)
        control.add_post("/v1/handover", self._handover)
        return control

    async def _list(self, _request: Request) -> Response:
        return Response.json(self._pods())

    async def _pod(self, request: Request) -> Response:
        key = f"{request.match_info['namespace']}/{request.match_info['name']}"
        reason = self._runtime.skipped.get(key)
        if reason is not None:
            return Response.json({"skipped": key, "reason": reason})
        for pod in self._pods():
            if f"{pod['namespace']}/{pod['name']}" == key:
                return Response.json(pod)
        return Response.json({"error": f"pod {key} is not enrolled"}, NOT_FOUND)

    async def _enroll(self, request: Request) -> Response:
        try:
            body = request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return Response.json({"error": f"request body is not JSON: {e}"}, BAD_REQUEST)
        try:
            result = await self._runtime.enroll(parse_workload(body))
        except InvalidPod as e:
            return Response.json({"error": "invalid pod", "problems": e.problems}, BAD_REQUEST)
        except EnrollError as e:
            return Response.json({"error": str(e)}, CONFLICT)
        except PodSetupFailed as e:
            return Response.json({"error": str(e)}, BAD_REQUEST)
        if isinstance(result, Enrolled):
            return Response.json({"enrolled": result.key, "podId": result.pod_id})
        if isinstance(result, Registered):
            return Response.json({"registered": result.key, "node": result.node})
        assert isinstance(result, Skipped)
        return Response.json({"skipped": result.key, "reason": result.reason})

    async def _unenroll(self, request: Request) -> Response:
        try:
            done = await self._runtime.unenroll(request.match_info["namespace"],
                                                request.match_info["name"])
        except NotEnrolled as e:
            return Response.json({"error": str(e)}, NOT_FOUND)
        if done.was == "skipped":
            return Response.json({"unenrolled": done.key, "wasSkipped": True})
        if done.was == "registered":
            return Response.json({"unregistered": done.key})
        return Response.json({"unenrolled": done.key})

    async def _handover(self, _request: Request) -> Response:
        try:
            open_connections = await self._hand_over()
        except HandoverRefused as e:
            return Response.json({"error": str(e)}, CONFLICT)
        return Response.json({"openConnections": open_connections})
