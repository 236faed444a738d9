"""Pods enrolled at run time survive a restart: the file they are saved in.

`<node.stateDir>/<node.name>/runtime-pods.json` holds a JSON list of pods in the node
YAML's own form (camelCase, as `POST /v1/pods` takes them): the pods enrolled on this node
through the control socket and the pods on other nodes registered there.  A pod the API
completed (nodeproxy.daemon.runtime_pods) also carries ``labelsSent``, the labels the
CNI plugin sent, so a restart can tell the plugin's labels from the API's.  It is written
whole after every change, through a temporary file and a rename, so a crash leaves the old
list or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nodeproxy.config.model import Workload

log = logging.getLogger(__name__)

FILE_NAME = "runtime-pods.json"


class SavedPods:
    def __init__(self, state_dir: str, node: str):
        self.path = Path(state_dir) / node / FILE_NAME

    def save(self, workloads: Iterable[Workload],
             sent_labels: Mapping[str, dict[str, str]] | None = None) -> None:
        """Write the pods; `sent_labels` (by namespace/name) become their ``labelsSent``."""
        sent_labels = sent_labels or {}
        pods = []
        for w in workloads:
            pod = w.model_dump(mode="json", by_alias=True, exclude_none=True)
            if w.key in sent_labels:
                pod["labelsSent"] = sent_labels[w.key]
            pods.append(pod)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(pods, indent=1))
        os.replace(tmp, self.path)

    def load(self) -> list[Any]:
        """The saved pods as written (each still to be validated), or none: no file yet,
        or one that cannot be read (logged; the pods in it are not restored)."""
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as e:
            log.error("%s: cannot read pods enrolled before the restart: %s", self.path, e)
            return []
        if not isinstance(saved, list):
            log.error("%s: cannot read pods enrolled before the restart: not a list",
                      self.path)
            return []
        return saved
