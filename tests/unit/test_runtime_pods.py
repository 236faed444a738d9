"""Pods enrolled at run time: the typed domain (nodeproxy.daemon.runtime_pods), their
saved file (saved_pods) and the control API's mapping of results and errors to HTTP
(control_api).  The real enrollment needs root and netns (tests/integration/test_cli.py,
test_cni.py); here a stand-in records what it is asked, so every answer of the API can be
checked without root."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nodeproxy.admin.http_server import HttpServer
from nodeproxy.config.model import Workload
from nodeproxy.daemon.control_api import ControlApi
from nodeproxy.daemon.handover import HandoverRefused
from nodeproxy.daemon.runtime_pods import (
    NOT_MESHED,
    Enrolled,
    InvalidPod,
    NotEnrolled,
    Registered,
    RuntimePods,
    Skipped,
    complete_from_api,
    parse_workload,
)
from nodeproxy.daemon.saved_pods import SavedPods
from nodeproxy.discovery.state import DiscoveredState
from nodeproxy.pods.enrollment import EnrollError

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
LOCAL = {"name": "web", "namespace": "shop", "netns": "/run/netns/web",
         "cgroup": "/sys/fs/cgroup/pods/web", "ips": ["10.244.1.5"]}


def _api_state(labels: dict[str, str]) -> DiscoveredState:
    """What the Kubernetes API says of LOCAL's pod: `labels`, in an ambient namespace."""
    known = Workload.model_validate({"name": "web", "namespace": "shop",
                                     "ips": ["10.244.1.5"], "serviceAccount": "web-sa",
                                     "labels": labels})
    return DiscoveredState.build(1, [known], [], {"shop": AMBIENT})


@dataclass
class _Pod:
    workload: Workload
    pod_id: int
    source: str

    @property
    def key(self) -> str:
        return self.workload.key


@dataclass
class StandInEnrollment:
    """Enrollment's interface: a pod named "taken" conflicts, one named "gone" has a netns
    the kernel refuses; others enroll with the next id."""

    pods: dict[str, _Pod] = field(default_factory=dict)

    async def enroll(self, workload: Workload, source: str) -> _Pod:
        if workload.name == "taken":
            raise EnrollError(f"pod {workload.key}: IP 10.244.1.5 already belongs to pod x/y")
        if workload.name == "gone":
            raise FileNotFoundError(2, "No such file or directory")
        pod = _Pod(workload, len(self.pods) + 1, source)
        self.pods[workload.key] = pod
        return pod

    async def unenroll(self, key: str, cause: str) -> bool:
        return self.pods.pop(key, None) is not None

    def update(self, workload: Workload) -> bool:
        self.pods[workload.key].workload = workload
        return True


def runtime(tmp_path: Path, discovered: DiscoveredState | None = None
            ) -> tuple[RuntimePods, StandInEnrollment, list[str]]:
    enrollment = StandInEnrollment()
    changes: list[str] = []
    pods = RuntimePods(node="n1", enrollment=enrollment,  # type: ignore[arg-type]
                       discovered=lambda: discovered, saved=SavedPods(str(tmp_path), "n1"),
                       on_change=lambda: changes.append("changed"))
    return pods, enrollment, changes


def following_api(tmp_path: Path, enrollment: StandInEnrollment,
                  current: list[DiscoveredState] | list[DiscoveredState | None]
                  ) -> RuntimePods:
    """Run-time pods whose API view is whatever `current[0]` holds when read."""
    return RuntimePods(node="n1", enrollment=enrollment,  # type: ignore[arg-type]
                       discovered=lambda: current[0], saved=SavedPods(str(tmp_path), "n1"),
                       on_change=lambda: None)


def saved(tmp_path: Path) -> list[Any]:
    return json.loads((tmp_path / "n1" / "runtime-pods.json").read_text())


# -- the domain -----------------------------------------------------------------------------


def test_an_invalid_pod_names_each_problem() -> None:
    with pytest.raises(InvalidPod) as info:
        parse_workload({"name": "Bad_Name", "ips": [], "extra": 1})
    problems = info.value.problems
    assert len(problems) == 3 and any(p.startswith("name:") for p in problems)
    assert any(p.startswith("ips:") for p in problems)
    assert any(p.startswith("extra:") for p in problems)


def test_the_api_completes_a_pod_and_says_when_it_is_not_meshed() -> None:
    known = Workload.model_validate({"name": "web", "namespace": "shop", "ips": ["10.0.0.1"],
                                     "serviceAccount": "web-sa",
                                     "labels": {"app": "web", "tier": "api"}})
    state = DiscoveredState.build(1, [known], [], {"shop": AMBIENT})
    sent = parse_workload({**LOCAL, "labels": {"tier": "front"}})
    completed, reason = complete_from_api(sent, state)
    assert reason is None and completed.service_account == "web-sa"
    assert completed.labels == {"app": "web", "tier": "front"}  # the plugin's labels win
    assert complete_from_api(sent, None) == (sent, None)  # discovery off: unchanged
    opted_out = parse_workload({**LOCAL, "labels": {"istio.io/dataplane-mode": "none"}})
    assert complete_from_api(opted_out, state)[1] == NOT_MESHED


def test_enroll_register_skip_and_unenroll_each_return_what_happened(tmp_path: Path) -> None:
    not_meshed = DiscoveredState.build(
        1, [Workload.model_validate({"name": "skip", "namespace": "shop", "ips": ["10.0.0.2"],
                                     "labels": {"istio.io/dataplane-mode": "none"}})],
        [], {"shop": AMBIENT})
    pods, enrollment, changes = runtime(tmp_path, not_meshed)

    async def scenario() -> list[object]:
        return [
            await pods.enroll(parse_workload(LOCAL)),
            await pods.enroll(parse_workload({"name": "far", "namespace": "shop", "node": "n2",
                                              "ips": ["10.244.2.5"]})),
            await pods.enroll(parse_workload({**LOCAL, "name": "skip", "ips": ["10.0.0.2"]})),
            await pods.unenroll("shop", "skip"),
            await pods.unenroll("shop", "far"),
            await pods.unenroll("shop", "web"),
        ]

    results = asyncio.run(scenario())
    assert results[:3] == [Enrolled("shop/web", 1), Registered("shop/far", "n2"),
                           Skipped("shop/skip", NOT_MESHED)]
    assert [(r.key, r.was) for r in results[3:]] == [  # type: ignore[attr-defined]
        ("shop/skip", "skipped"), ("shop/far", "registered"), ("shop/web", "enrolled")]
    assert changes == ["changed", "changed"]  # the remote pod came and went
    assert enrollment.pods == {} and saved(tmp_path) == []
    with pytest.raises(NotEnrolled):
        asyncio.run(pods.unenroll("shop", "web"))


def test_saved_pods_come_back_after_a_restart_and_a_bad_one_does_not_stop_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first, _, _ = runtime(tmp_path)

    async def enroll_two() -> None:
        await first.enroll(parse_workload(LOCAL))
        await first.enroll(parse_workload({"name": "far", "node": "n2", "ips": ["10.2.0.1"]}))

    asyncio.run(enroll_two())
    file = saved(tmp_path)
    assert [p["name"] for p in file] == ["web", "far"]
    assert file[0]["netns"] == "/run/netns/web" and "serviceAccount" in file[0]
    # Someone slipped an invalid and a conflicting pod into the file.
    (tmp_path / "n1" / "runtime-pods.json").write_text(json.dumps(
        [{"name": "Bad_Name", "ips": ["10.0.0.9"]}, {**LOCAL, "name": "taken"}, *file]))
    second, enrollment, _ = runtime(tmp_path)
    with caplog.at_level(logging.WARNING):
        asyncio.run(second.restore())
    assert list(enrollment.pods) == ["shop/web"] and list(second.remote) == ["default/far"]
    refused = [r.getMessage() for r in caplog.records if "not restored" in r.getMessage()]
    assert len(refused) == 2 and "invalid pod: name:" in refused[0]
    assert "already belongs" in refused[1]
    assert [p["name"] for p in saved(tmp_path)] == ["web", "far"]  # what is enrolled now
    assert not list((tmp_path / "n1").glob("*.tmp"))


def test_an_unreadable_saved_file_restores_nothing_and_is_reported(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "n1").mkdir()
    (tmp_path / "n1" / "runtime-pods.json").write_text("[{not json")
    pods, enrollment, _ = runtime(tmp_path)
    with caplog.at_level(logging.ERROR):
        asyncio.run(pods.restore())
    assert enrollment.pods == {}
    assert any("cannot read pods enrolled before the restart" in r.getMessage()
               for r in caplog.records)


# -- the control API: typed results and errors to HTTP --------------------------------------


async def _ask(api: ControlApi, calls: list[tuple[str, str, Any]]) -> list[tuple[int, Any]]:
    answers = []
    server = HttpServer(api.app())
    await server.start_tcp("127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as client:
            for method, path, body in calls:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                async with client.request(method, path, data=data if body is not None
                                          else None) as response:
                    answers.append((response.status, await response.json()))
    finally:
        await server.stop()
    return answers


def test_the_control_api_answers_each_result_and_error_with_its_status(
        tmp_path: Path) -> None:
    pods, enrollment, _ = runtime(tmp_path)
    handed_over: list[bool] = []

    async def hand_over() -> int:
        if handed_over:
            raise HandoverRefused("not running")
        handed_over.append(True)
        return 3

    api = ControlApi(pods=lambda: [{"namespace": p.workload.namespace,
                                    "name": p.workload.name, "podId": p.pod_id}
                                   for p in enrollment.pods.values()],
                     runtime=pods, hand_over=hand_over)
    pods.skipped["shop/optout"] = NOT_MESHED
    answers = asyncio.run(_ask(api, [
        ("POST", "/v1/pods", b"{not json"),
        ("POST", "/v1/pods", {"name": "web"}),
        ("POST", "/v1/pods", {**LOCAL, "name": "taken"}),
        ("POST", "/v1/pods", {**LOCAL, "name": "gone"}),
        ("POST", "/v1/pods", LOCAL),
        ("POST", "/v1/pods", {"name": "far", "node": "n2", "ips": ["10.2.0.1"]}),
        ("GET", "/v1/pods", None),
        ("GET", "/v1/pods/shop/web", None),
        ("GET", "/v1/pods/shop/optout", None),
        ("GET", "/v1/pods/shop/nobody", None),
        ("DELETE", "/v1/pods/shop/optout", None),
        ("DELETE", "/v1/pods/default/far", None),
        ("DELETE", "/v1/pods/shop/web", None),
        ("DELETE", "/v1/pods/shop/web", None),
        ("POST", "/v1/handover", {}),
        ("POST", "/v1/handover", {}),
    ]))
    status = [a[0] for a in answers]
    assert status == [400, 400, 409, 400, 200, 200, 200, 200, 200, 404, 200, 200, 200, 404,
                      200, 409]
    assert answers[0][1]["error"].startswith("request body is not JSON")
    assert answers[1][1]["error"] == "invalid pod" and answers[1][1]["problems"] == [
        "ips: Field required"]
    assert "already belongs" in answers[2][1]["error"]
    assert answers[3][1] == {"error": "pod shop/gone: [Errno 2] No such file or directory"}
    assert answers[4][1] == {"enrolled": "shop/web", "podId": 1}
    assert answers[5][1] == {"registered": "default/far", "node": "n2"}
    assert answers[6][1] == [{"namespace": "shop", "name": "web", "podId": 1}]
    assert answers[7][1] == {"namespace": "shop", "name": "web", "podId": 1}
    assert answers[8][1] == {"skipped": "shop/optout", "reason": NOT_MESHED}
    assert answers[9][1] == {"error": "pod shop/nobody is not enrolled"}
    assert answers[10][1] == {"unenrolled": "shop/optout", "wasSkipped": True}
    assert answers[11][1] == {"unregistered": "default/far"}
    assert answers[12][1] == {"unenrolled": "shop/web"}
    assert answers[13][1] == {"error": "pod shop/web is not enrolled"}
    assert answers[14][1] == {"openConnections": 3}
    assert answers[15][1] == {"error": "not running"}



def test_a_relabel_in_the_api_reaches_a_pod_enrolled_at_run_time(tmp_path: Path) -> None:
    """review7: the API's labels were read once, at enrollment, so a DENY selecting a
    label put on the pod later (kubectl label) never applied to it.  follow_api (each
    discovery update) applies the API's labels, under the plugin's own, in place."""
    current = [_api_state({"app": "web", "tier": "api"})]

    enrollment = StandInEnrollment()
    pods = following_api(tmp_path, enrollment, current)
    asyncio.run(pods.enroll(parse_workload({**LOCAL, "labels": {"tier": "front"}})))
    labels = lambda: enrollment.pods["shop/web"].workload.labels  # noqa: E731
    assert labels() == {"app": "web", "tier": "front"}
    current[0] = _api_state({"app": "web", "tier": "api", "lock": "yes"})
    pods.follow_api()
    assert labels() == {"app": "web", "tier": "front", "lock": "yes"}
    assert enrollment.pods["shop/web"].workload.service_account == "web-sa"
    current[0] = _api_state({"app": "web"})  # a label taken off in the API comes off
    pods.follow_api()
    assert labels() == {"app": "web", "tier": "front"}  # the plugin's own stays
    asyncio.run(pods.unenroll("shop", "web"))
    pods.follow_api()  # nothing left to follow


def test_a_relabel_while_the_pod_is_being_set_up_is_not_lost(tmp_path: Path) -> None:
    """review8: enroll completed the pod from the API, then awaited the kernel's set-up;
    a discovery update in that await (the pod relabelled into a DENY's selector) found no
    pod to follow yet, so the pod kept the labels from before the relabel until some later
    update, however late.  Enrollment follows the API once more when set-up ends."""
    current = [_api_state({"app": "web"})]
    pods_box: list[RuntimePods] = []

    class SlowSetUp(StandInEnrollment):
        async def enroll(self, workload: Workload, source: str) -> _Pod:
            await asyncio.sleep(0)
            # the relabel lands while the kernel is being set up: the daemon's
            # _on_discovery stores the state and calls follow_api
            current[0] = _api_state({"app": "web", "quarantine": "yes"})
            pods_box[0].follow_api()
            await asyncio.sleep(0)
            return await super().enroll(workload, source)

    enrollment = SlowSetUp()
    pods = following_api(tmp_path, enrollment, current)
    pods_box.append(pods)
    asyncio.run(pods.enroll(parse_workload(LOCAL)))
    assert enrollment.pods["shop/web"].workload.labels == {"app": "web", "quarantine": "yes"}
    # and what is saved is what is in force
    assert saved(tmp_path)[0]["labels"] == {"app": "web", "quarantine": "yes"}


@pytest.mark.parametrize("api_at_restart", [True, False])
def test_a_label_the_api_took_off_while_the_daemon_was_down_comes_off_after_the_restart(
        tmp_path: Path, api_at_restart: bool) -> None:
    """review8: a restored pod counted all its saved labels as the plugin's, so a label
    the API had added and then took off (a PERMISSIVE PeerAuthentication's selector, an
    ALLOW's) stayed on the pod for good.  The saved file now carries the plugin's own
    labels: the API completes them again at restore, or, when the API has not answered
    by then, at its first update (the pod is enrolled as saved meanwhile)."""
    def daemon(current: list[DiscoveredState | None]
               ) -> tuple[RuntimePods, StandInEnrollment]:
        enrollment = StandInEnrollment()
        return following_api(tmp_path, enrollment, current), enrollment

    first, _ = daemon([_api_state({"app": "web", "mode": "permissive"})])
    asyncio.run(first.enroll(parse_workload({**LOCAL, "labels": {"tier": "front"}})))
    # the daemon stops; meanwhile the label is taken off in the API; the daemon starts
    current: list[DiscoveredState | None] = [
        _api_state({"app": "web"}) if api_at_restart else None]
    second, enrollment = daemon(current)
    asyncio.run(second.restore())
    labels = lambda: enrollment.pods["shop/web"].workload.labels  # noqa: E731
    if not api_at_restart:  # as saved until the API answers
        assert labels() == {"app": "web", "mode": "permissive", "tier": "front"}
        current[0] = _api_state({"app": "web"})
        second.follow_api()
    assert labels() == {"app": "web", "tier": "front"}
    assert enrollment.pods["shop/web"].workload.service_account == "web-sa"
