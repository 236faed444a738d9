"""What the admin pages and the control socket show of the daemon (JSON-ready dicts)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nodeproxy.config.loader import LoadedConfig
from nodeproxy.config.model import Workload
from nodeproxy.mesh.enrolled_pod import EnrolledPod


def pod_view(pod: EnrolledPod) -> dict[str, Any]:
    """One enrolled pod (/pods, GET /v1/pods)."""
    return {
        "namespace": pod.workload.namespace,
        "name": pod.workload.name,
        "workload": pod.ref.workload,
        "serviceAccount": pod.workload.service_account,
        "principal": pod.principal,
        "ips": [str(ip) for ip in pod.workload.ips],
        "netns": pod.workload.netns,
        "cgroup": pod.workload.cgroup,
        "podId": pod.pod_id,
        "netnsCookie": pod.netns_cookie,
        "source": pod.source,
    }


def config_dump(loaded: LoadedConfig, pod_cgroup: str | None,
                runtime_workloads: Iterable[Workload]) -> dict[str, Any]:
    """/config_dump: the node file in force and the pods enrolled or registered at run time."""
    return {
        "source": loaded.source,
        "digest": loaded.digest,
        "loadedAt": loaded.loaded_at,
        "podCgroup": pod_cgroup,
        "config": loaded.config.model_dump(mode="json", by_alias=True),
        "runtimeWorkloads": [w.model_dump(mode="json", by_alias=True)
                             for w in runtime_workloads],
    }
