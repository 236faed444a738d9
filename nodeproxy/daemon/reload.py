"""Reload: validate the node file again and apply it whole, or keep the version in force.

Triggered by SIGHUP and by the file watcher (nodeproxy.config.watcher).  Validation: the
file must load with the same checks as at start; a file whose digest is the one in force
is `unchanged`; one that changes a section only a restart can change
(nodeproxy.config.changes) is `rejected`, naming the sections, and nothing is applied.
Applying (`apply_config`): pods the file no longer lists are unenrolled, new ones enrolled
and changed ones updated in place (labels, service account) or enrolled again (netns,
cgroup or address); the mesh state is built once more, so destinations, admission and the
kernel denies switch together; splicing and sk_msg follow `fastPath`; the per-source caps
follow `limits`.  Results are counted in `nodeproxy_config_reload_total{result}`; the
version in force is `nodeproxy_config_info{digest}`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from nodeproxy.config import watcher
from nodeproxy.config.changes import (
    WorkloadChanges,
    local_workload_changes,
    restart_only_changes,
)
from nodeproxy.config.loader import ConfigError, LoadedConfig, load_config
from nodeproxy.config.model import NodeConfig
from nodeproxy.daemon.wiring import Kernel, Shares
from nodeproxy.pods.enrollment import EnrollError, Enrollment

log = logging.getLogger(__name__)

APPLIED, UNCHANGED, REJECTED = "applied", "unchanged", "rejected"

# Puts the new version's changes in force (the loaded config is already the new one).
ApplyConfig = Callable[[NodeConfig, WorkloadChanges], Awaitable[None]]


class ConfigReloader:
    """Owns the node file version in force."""

    def __init__(self, loaded: LoadedConfig, registry: CollectorRegistry):
        self.loaded = loaded
        self.seen_digest = loaded.digest  # last file version applied or refused
        self._lock = asyncio.Lock()
        self._results = Counter(
            "nodeproxy_config_reload", "Reloads of the node policy, by result",
            ("result",), registry=registry)
        self._info = Gauge(
            "nodeproxy_config_info", "The node policy version in force (sha256 of the file)",
            ("digest",), registry=registry)
        self._info.labels(loaded.digest).set(1)

    async def reload(self, trigger: str, apply: ApplyConfig) -> str:
        """Validate the file again and apply it whole, or keep the version in force.
        Returns the result: applied, unchanged or rejected."""
        async with self._lock:
            result = await self._reload(trigger, apply)
        self._results.labels(result).inc()
        return result

    def _validate(self, trigger: str) -> LoadedConfig | str:
        """The new version, or why nothing is to be applied (unchanged, rejected)."""
        source = self.loaded.source
        try:
            new = load_config(source, check_environment=True)
        except ConfigError as e:
            self.seen_digest = watcher.file_digest(source) or self.seen_digest
            log.error("reload (%s) of %s refused; the version in force (%s) stays:\n%s",
                      trigger, source, self.loaded.digest[:12], e)
            return REJECTED
        self.seen_digest = new.digest
        if new.digest == self.loaded.digest:
            return UNCHANGED
        restart = restart_only_changes(self.loaded.config, new.config)
        if restart:
            log.error("reload (%s) of %s refused: %s changed, which takes effect only when "
                      "the daemon restarts; nothing was applied", trigger, source,
                      ", ".join(restart))
            return REJECTED
        return new

    async def _reload(self, trigger: str, apply: ApplyConfig) -> str:
        new = self._validate(trigger)
        if isinstance(new, str):
            return new
        old = self.loaded
        changes = local_workload_changes(old.config, new.config)
        self.loaded = new
        await apply(new.config, changes)
        self._info.clear()
        self._info.labels(new.digest).set(1)
        log.info("reload (%s): %s -> %s applied (%d pods added, %d removed, %d changed)",
                 trigger, old.digest[:12], new.digest[:12], len(changes.added),
                 len(changes.removed), len(changes.changed))
        return APPLIED


async def apply_config(config: NodeConfig, changes: WorkloadChanges, *, source: str,
                       enrollment: Enrollment, kernel: Kernel, shares: Shares,
                       publish: Callable[[], None]) -> None:
    """Put a validated new version in force (see the module docstring)."""
    # A pod whose labels or service account changed is updated in place; only a new
    # netns, cgroup or address needs it enrolled again.
    again = tuple(w for w in changes.changed if not enrollment.update(w))
    for w in changes.removed + again:
        await enrollment.unenroll(w.key, "config")
    for w in again + changes.added:
        try:
            await enrollment.enroll(w, "config")
        except (EnrollError, OSError) as e:
            log.error("%s: could not enroll pod %s: %s", source, w.key, e)
    # Tables, admission and the kernel's deny map switch together, in one step.
    publish()
    await _apply_fast_path(kernel, config, changes)
    if kernel.msg_redirect is not None:  # new connections only
        kernel.msg_redirect.set_enabled(config.fast_path.sk_msg)
    shares.apply(config.limits)


async def _apply_fast_path(kernel: Kernel, config: NodeConfig,
                           changes: WorkloadChanges) -> None:
    """Splicing switched off (globally or for a pod): the kernel gives those flows back,
    and relayed flows waiting to be spliced (fastPath.spliceAfterBytes) never are."""
    splicer = kernel.splicer
    splicer.enabled = config.fast_path.splice
    splicer.after_bytes = config.fast_path.splice_after_bytes
    opted_out = {w.key for w in changes.changed if not w.splice}
    for w in changes.removed:
        splicer.opted_out.discard(w.key)
    for w in changes.added + changes.changed:
        if w.splice:
            splicer.opted_out.discard(w.key)
        else:
            splicer.opted_out.add(w.key)
    taken = await splicer.take_back(
        lambda flow: not splicer.enabled or bool(opted_out.intersection(flow.pods)))
    if taken:
        log.info("took %d spliced flows back from the kernel", taken)
