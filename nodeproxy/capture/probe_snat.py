"""Kubelet's probes from an address of their own: the SNAT rules in the node's nat table.

With ``inbound.probeSnat`` the daemon keeps one chain in its own network namespace (the
node's: the DaemonSet runs with hostNetwork), per address family::

    nat POSTROUTING       -j NODEPROXY_PROBE_SNAT                  (its first rule)
    NODEPROXY_PROBE_SNAT  -d <enrolled pod address> -p tcp -m owner --socket-exists
                          -j SNAT --to-source <the probe address>

``--socket-exists`` matches packets that a local socket sent: connections a process of
the node opens, kubelet's probes among them (and a hostNetwork pod's, which the node's
address exempted before as well).  A connection the node forwards, such as a NodePort or
LoadBalancer connection that kube-proxy masquerades to the node's own address, has no
local socket: its source stays the node's and inbound capture steers it like any other
source.  Only the probe addresses are exempt (``InboundSettings.all_probe_sources``), so
listing the node's address in ``inbound.probeSources`` is no longer needed.  Istio's CNI
agent rewrites probes the same way, with an ipset where this has a rule per address.

Only connections to enrolled pods are rewritten: a pod outside the mesh keeps seeing the
node's address.  NAT is decided on a connection's first packet, so a change affects new
connections only.

This module owns the rule text (pure functions over ``iptables-save`` output), applying
it with ``iptables-restore`` in the daemon's own netns, and ``ProbeSnatKeeper``, which
follows the enrolled pods' addresses: one write at a time in a worker thread, changes
that arrive meanwhile coalesced into the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from nodeproxy.capture import iptables

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CHAIN = "NODEPROXY_PROBE_SNAT"
TABLE = "nat"
BUILTIN = "POSTROUTING"
WHAT = "the node's probe SNAT rules"
RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class ProbeSnatRules:
    """What the chain should hold: the probe address of each family (None: that family's
    probes are not rewritten) and the enrolled pods' addresses."""

    ipv4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Address | None
    pod_ips: frozenset[IPAddress]

    def address(self, family: iptables.Family) -> IPAddress | None:
        return self.ipv4 if family.version == 4 else self.ipv6


def snat_rules(family: iptables.Family, rules: ProbeSnatRules) -> list[str]:
    """The chain's rules of this family as iptables-restore lines, in a stable order."""
    address = rules.address(family)
    if address is None:
        return []
    prefix = 32 if family.version == 4 else 128
    return [f"-A {CHAIN} -d {ip}/{prefix} -p tcp -m owner --socket-exists "
            f"-j SNAT --to-source {address}"
            for ip in sorted(ip for ip in rules.pod_ips if ip.version == family.version)]


def install_script(family: iptables.Family, rules: ProbeSnatRules,
                   saved: iptables.SavedRules) -> str:
    """An ``iptables-restore --noflush`` input that makes our chain exactly ``rules`` and
    its jump the first rule of POSTROUTING, whatever an earlier instance left."""
    state = saved.tables.get(TABLE, iptables.TableState())
    return "\n".join([
        f"*{TABLE}",
        f":{CHAIN} - [0:0]",  # creates, or flushes if present
        *(f"-D {rule}" for rule in iptables.jumps_to(state, CHAIN)),
        f"-I {BUILTIN} 1 -j {CHAIN}",
        *snat_rules(family, rules),
        "COMMIT",
    ]) + "\n"


def removal_script(saved: iptables.SavedRules) -> str:
    """Deletes our jump and chain, exactly those present in ``saved`` ("" if none)."""
    state = saved.tables.get(TABLE, iptables.TableState())
    jumps = iptables.jumps_to(state, CHAIN)
    if not jumps and CHAIN not in state.chains:
        return ""
    lines = [f"*{TABLE}", *(f"-D {rule}" for rule in jumps)]
    if CHAIN in state.chains:
        lines += [f"-F {CHAIN}", f"-X {CHAIN}"]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def install(rules: ProbeSnatRules) -> None:
    """Write the rules of both families in the daemon's netns.  Blocking: call from a
    worker thread.  A family without a probe address gets no chain (an earlier one is
    removed)."""
    for family in iptables.FAMILIES:
        saved = iptables.read(None, family, WHAT)
        if rules.address(family) is None:
            script = removal_script(saved)
        else:
            script = install_script(family, rules, saved)
        if script:
            iptables.restore(None, family, WHAT, script)


def remove() -> None:
    """Delete our jump and chain of every family (idempotent).  Blocking.  Every family
    is tried; the first failure is raised."""
    problems: list[iptables.IptablesError] = []
    for family in iptables.FAMILIES:
        try:
            script = removal_script(iptables.read(None, family, WHAT))
            if script:
                iptables.restore(None, family, WHAT, script)
        except iptables.IptablesError as e:
            problems.append(e)
    if problems:
        raise problems[0]


def installed(family: iptables.Family) -> list[str] | None:
    """Our chain's rules in the daemon's netns (None: no chain), for tests and
    diagnostics."""
    state = iptables.read(None, family, WHAT).tables.get(TABLE, iptables.TableState())
    if CHAIN not in state.chains:
        return None
    return [r.split(" ", 1)[1] for r in state.rules if r.split(" ", 1)[0] == CHAIN]


class ProbeSnatKeeper:
    """Keeps the node's probe SNAT rules equal to what was last asked for.

    ``want`` is cheap and synchronous (the daemon calls it with every mesh snapshot);
    the writes run one at a time in a worker thread.  A write that fails is logged and
    tried again every RETRY_SECONDS while it is still wanted; the rules written before
    stay in force meanwhile.  ``close`` lets a write in progress finish (a worker thread
    cannot be cancelled: one still running would write its rules after the removal) and
    then removes the chain."""

    def __init__(self) -> None:
        self._wanted: ProbeSnatRules | None = None  # None: no rules wanted
        self._applied: ProbeSnatRules | None = None
        self._touched = False  # something of ours may be in the node's tables
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    def want(self, ipv4: ipaddress.IPv4Address | None, ipv6: ipaddress.IPv6Address | None,
             pod_ips: Iterable[IPAddress]) -> None:
        """Ask for these rules (both addresses None: none at all).  Ignored once closing."""
        if self._closing.is_set():
            return
        wanted = (None if ipv4 is None and ipv6 is None
                  else ProbeSnatRules(ipv4, ipv6, frozenset(pod_ips)))
        if wanted == self._wanted:
            return
        self._wanted = wanted
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write())

    def _behind(self) -> bool:
        return self._applied != self._wanted or (self._wanted is None and self._touched)

    async def _write(self) -> None:
        last_error = ""
        while not self._closing.is_set() and self._behind():
            wanted = self._wanted
            try:
                if wanted is None:
                    await asyncio.to_thread(remove)
                    self._touched = False
                else:
                    self._touched = True
                    await asyncio.to_thread(install, wanted)
            except iptables.IptablesError as e:
                if str(e) != last_error:
                    log.error("inbound.probeSnat: %s; retrying every %.0fs", e, RETRY_SECONDS)
                    last_error = str(e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), RETRY_SECONDS)
                continue
            self._applied = wanted
            if last_error:
                log.info("inbound.probeSnat: rules written")
                last_error = ""

    async def settled(self) -> None:
        """Wait until the last write asked for has run (start-up before /ready, tests)."""
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop writing and remove what this daemon wrote (not after a handover: the new
        instance keeps the chain, rewritten with its own pods).  A write in progress
        finishes first, so nothing is written after the removal."""
        self._closing.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._touched:
            try:
                await asyncio.to_thread(remove)
            except iptables.IptablesError as e:
                log.error("inbound.probeSnat: the rules could not be removed: %s", e)
            self._touched = False
