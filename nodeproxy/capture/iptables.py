"""iptables capture: the rules that steer one pod's TCP to the proxy, inside the pod's netns.

``capture.mode: iptables`` is for kernels without the cgroup/connect and sk_lookup hooks.
Each enrolled pod's network namespace gets, per address family (iptables, ip6tables),
four chains of ours, each jumped to from the top of a built-in chain:

===========================  ====================================================================
``raw OUTPUT``               ``NODEPROXY_NOTRACK``: the proxy's transparent connections into the
                             pod (TRANSPARENT_MARK, and the application's replies, which inherit
                             it) are not tracked, so they never meet the NAT state of a
                             redirected client that used the same address and port
``nat OUTPUT``               ``NODEPROXY_OUTPUT``: the pod's outbound TCP is REDIRECTed to the
                             outbound port (127.0.0.1 / ::1), except loopback destinations and
                             the proxy's own sockets (SOCKET_MARK, TRANSPARENT_MARK)
``nat PREROUTING``           ``NODEPROXY_PREROUTING``: TCP arriving for the pod is REDIRECTed to
                             the inbound port, except the HBONE and inbound ports themselves
                             and connections from a probe source (inbound.probeSources), which
                             reach the application itself
``filter OUTPUT``            ``NODEPROXY_DENY``: identity-free DENY rules (the ones eBPF mode
                             answers in cgroup/connect with EPERM) as REJECT with a TCP reset, so
                             the pod's connect() fails at once with ECONNREFUSED; matched on the
                             conntrack original destination, since nat OUTPUT ran first
===========================  ====================================================================

The proxy reads the original destination with getsockopt(SO_ORIGINAL_DST)
(nodeproxy.capture.original_dst).

This module owns the rule text (pure functions over ``iptables-save`` output) and applying
it: ``iptables-restore --noflush`` run from a thread inside the pod's netns, one atomic
transaction per family.  Installing replaces whatever an earlier instance left: our chains
are declared again, which flushes them, and jumps to them are deleted before the new ones
are inserted.  Removing deletes exactly our jumps and chains; a table that is then empty
(built-in chains only, no rule, ACCEPT policies) is dropped with ``nft`` when the
iptables backend is nf_tables, so the pod is as it was before (an empty nat table would
keep connection tracking on in it).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nodeproxy import ports
from nodeproxy.capture.constants import SOCKET_MARK, TRANSPARENT_MARK
from nodeproxy.capture.namespaces import entered

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PREFIX = "NODEPROXY_"
NOTRACK = "NODEPROXY_NOTRACK"
OUTPUT = "NODEPROXY_OUTPUT"
PREROUTING = "NODEPROXY_PREROUTING"
DENY = "NODEPROXY_DENY"


@dataclass(frozen=True)
class Jump:
    """A rule at the top of a built-in chain that sends packets to one of our chains."""

    table: str
    builtin: str
    chain: str
    match: str = ""

    def rule(self) -> str:
        """The rule without its chain: ``-p tcp -j NODEPROXY_OUTPUT``."""
        return " ".join(filter(None, (self.match, "-j", self.chain)))


# In the order the tables are written; iptables-save prints rules in this canonical form.
JUMPS = (
    Jump("raw", "OUTPUT", NOTRACK),
    Jump("nat", "OUTPUT", OUTPUT, "-p tcp"),
    Jump("nat", "PREROUTING", PREROUTING, "-p tcp"),
    Jump("filter", "OUTPUT", DENY, "-p tcp"),
)
TABLES = ("raw", "nat", "filter")
RUN_TIMEOUT = 30.0


@dataclass(frozen=True)
class Family:
    """One address family's tools and loopback range."""

    version: int
    save: str
    restore: str
    loopback: str
    nft_family: str

    @property
    def name(self) -> str:
        return "iptables" if self.version == 4 else "ip6tables"


IPV4 = Family(4, "iptables-save", "iptables-restore", "127.0.0.0/8", "ip")
IPV6 = Family(6, "ip6tables-save", "ip6tables-restore", "::1/128", "ip6")
FAMILIES = (IPV4, IPV6)
BINARIES = ("iptables", "ip6tables", IPV4.save, IPV4.restore, IPV6.save, IPV6.restore)


@dataclass(frozen=True)
class Ports:
    """The proxy's ports inside the pod."""

    outbound: int = ports.OUTBOUND_PORT
    inbound: int = ports.INBOUND_PORT
    hbone: int = ports.HBONE_PORT


@dataclass(frozen=True)
class DenyRule:
    """An identity-free DENY: the pod may not open a TCP connection to ip:port."""

    ip: IPAddress
    port: int
    policy: str  # "<namespace>/<name>", shown in the rule's comment

    def sort_key(self) -> tuple[int, int, int, str]:
        return (self.ip.version, int(self.ip), self.port, self.policy)


class IptablesError(OSError):
    """A rule could not be read, installed or removed; the message names the pod.  An
    OSError, so enrolling reports it like any other failure to set a pod up."""


# ---------------------------------------------------------------- the rule text


def capture_rules(family: Family, ports: Ports,
                  probe_sources: Iterable[IPNetwork] = ()) -> dict[str, list[str]]:
    """The rules of our capture chains, by table, as iptables-restore lines.
    probe_sources: connections from them are not redirected (those of this family)."""
    probes = [f"-A {PREROUTING} -s {net} -j RETURN"
              for net in dict.fromkeys(probe_sources) if net.version == family.version]
    mark = f"-m mark --mark {SOCKET_MARK:#x}"
    transparent = f"-m mark --mark {TRANSPARENT_MARK:#x}"
    return {
        "raw": [f"-A {NOTRACK} {transparent} -j CT --notrack"],
        "nat": [
            f"-A {OUTPUT} {mark} -j RETURN",
            f"-A {OUTPUT} {transparent} -j RETURN",
            f"-A {OUTPUT} -d {family.loopback} -j RETURN",
            f"-A {OUTPUT} -p tcp -j REDIRECT --to-ports {ports.outbound}",
            f"-A {PREROUTING} -p tcp --dport {ports.hbone} -j RETURN",
            f"-A {PREROUTING} -p tcp --dport {ports.inbound} -j RETURN",
            f"-A {PREROUTING} {transparent} -j RETURN",
            *probes,
            f"-A {PREROUTING} -p tcp -j REDIRECT --to-ports {ports.inbound}",
        ],
        "filter": [],
    }


def deny_rules(family: Family, denies: Iterable[DenyRule]) -> list[str]:
    """One REJECT rule per deny of this family, in a stable order, duplicates dropped."""
    lines = []
    for deny in sorted({d for d in denies if d.ip.version == family.version},
                       key=DenyRule.sort_key):
        lines.append(
            f"-A {DENY} -p tcp -m conntrack --ctstate NEW --ctorigdst {deny.ip} "
            f"--ctorigdstport {deny.port} -m comment --comment \"{_comment(deny.policy)}\" "
            "-j REJECT --reject-with tcp-reset")
    return list(dict.fromkeys(lines))


def _comment(text: str) -> str:
    """A comment iptables-restore can read back: no quotes or backslashes, at most 255."""
    return re.sub(r"[\"\\\n]", "_", text)[:255]


@dataclass
class TableState:
    """One table of ``iptables-save`` output: chains (name -> policy) and rules."""

    chains: dict[str, str] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)


@dataclass
class SavedRules:
    tables: dict[str, TableState]
    nf_tables: bool  # saved by the nf_tables backend (iptables-nft)


def parse_save(text: str) -> SavedRules:
    """The tables, chains and rules in ``iptables-save`` output."""
    tables: dict[str, TableState] = {}
    current: TableState | None = None
    nf_tables = False
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("# Generated by") and "nf_tables" in line:
            nf_tables = True
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = tables.setdefault(line[1:], TableState())
        elif current is None or line == "COMMIT":
            continue
        elif line.startswith(":"):
            name, policy = (line[1:].split() + ["-"])[:2]
            current.chains[name] = policy
        elif line.startswith("-A "):
            current.rules.append(line[3:])
    return SavedRules(tables, nf_tables)


def jumps_to(state: TableState, chain: str) -> list[str]:
    """Rules of built-in chains that jump to this chain (as written by iptables-save)."""
    return [rule for rule in state.rules if rule.endswith(f" -j {chain}")
            and not rule.startswith(chain + " ")]


def _jumps_to_ours(state: TableState) -> list[str]:
    """Rules of built-in chains that jump to a chain of ours (as written by iptables-save)."""
    return [rule for rule in state.rules
            if not rule.startswith(PREFIX) and re.search(rf"-j {PREFIX}\w+$", rule)]


def _ours(state: TableState) -> list[str]:
    return [name for name in state.chains if name.startswith(PREFIX)]


def install_script(family: Family, ports: Ports, saved: SavedRules,
                   denies: Iterable[DenyRule] = (),
                   probe_sources: Iterable[IPNetwork] = ()) -> str:
    """An ``iptables-restore --noflush`` input that makes the pod's rules of this family
    exactly ours, whatever an earlier instance left (``saved``: the current rules)."""
    rules = capture_rules(family, ports, probe_sources)
    rules["filter"] = deny_rules(family, denies)
    out: list[str] = []
    for table in TABLES:
        jumps = [j for j in JUMPS if j.table == table]
        state = saved.tables.get(table, TableState())
        declared = {j.chain for j in jumps}
        out.append(f"*{table}")
        out += [f":{j.chain} - [0:0]" for j in jumps]  # creates, or flushes if present
        out += [f"-D {rule}" for rule in _jumps_to_ours(state)]
        stale = [name for name in _ours(state) if name not in declared]
        out += [f"-F {name}" for name in stale] + [f"-X {name}" for name in stale]
        out += [f"-I {j.builtin} 1 {j.rule()}" for j in reversed(jumps)]
        out += rules[table]
        out.append("COMMIT")
    return "\n".join(out) + "\n"


def deny_script(family: Family, denies: Iterable[DenyRule]) -> str:
    """Replace the deny chain's rules (the jump to it stays as installed)."""
    return "\n".join(["*filter", f":{DENY} - [0:0]", *deny_rules(family, denies),
                      "COMMIT"]) + "\n"


def removal_script(saved: SavedRules) -> str:
    """An ``iptables-restore --noflush`` input that deletes our jumps and chains, exactly
    those present in ``saved``; empty when there is nothing of ours."""
    out: list[str] = []
    for table, state in saved.tables.items():
        jumps, chains = _jumps_to_ours(state), _ours(state)
        if not jumps and not chains:
            continue
        out.append(f"*{table}")
        out += [f"-D {rule}" for rule in jumps]
        out += [f"-F {name}" for name in chains] + [f"-X {name}" for name in chains]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def tables_left_empty(saved: SavedRules) -> list[str]:
    """Tables that hold nothing once our jumps and chains are gone: built-in chains only,
    ACCEPT policies, no other rule."""
    empty = []
    for table, state in saved.tables.items():
        ours = set(_ours(state))
        if not ours:
            continue
        others = [r for r in state.rules if r.split(" ", 1)[0] not in ours]
        if [r for r in others if r not in _jumps_to_ours(state)]:
            continue
        if any(policy != "ACCEPT" for name, policy in state.chains.items()
               if name not in ours):
            continue
        empty.append(table)
    return empty


# ---------------------------------------------------------------- applying it


def missing_binaries() -> list[str]:
    """The iptables tools this mode needs that are not on PATH."""
    return [name for name in BINARIES if shutil.which(name) is None]


def _run(netns_fd: int | None, argv: Sequence[str], what: str, stdin: str = "") -> str:
    """Run one tool inside the netns (the child inherits this thread's netns); None: in
    the daemon's own."""
    if shutil.which(argv[0]) is None:
        raise IptablesError(f"{what}: {argv[0]} not found on PATH (apt install iptables)")
    try:
        with entered(netns_fd) if netns_fd is not None else contextlib.nullcontext():
            result = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                                    timeout=RUN_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise IptablesError(f"{what}: {argv[0]}: {e}") from e
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().replace("\n", "; ")
        raise IptablesError(f"{what}: {' '.join(argv)} failed (exit {result.returncode}): "
                            f"{detail}")
    return result.stdout


def read(netns_fd: int | None, family: Family, what: str) -> SavedRules:
    return parse_save(_run(netns_fd, [family.save], what))


def restore(netns_fd: int | None, family: Family, what: str, script: str) -> None:
    """Apply an ``iptables-restore --noflush`` input: one transaction per table."""
    _run(netns_fd, [family.restore, "-w", "--noflush"], what, script)


def install(netns_fd: int, what: str, ports: Ports, families: Sequence[Family] = FAMILIES,
            denies: Iterable[DenyRule] = (), probe_sources: Iterable[IPNetwork] = ()) -> None:
    """Install (or replace) the capture rules of these families in the netns.  Blocking:
    call from a worker thread.  ``what`` names the pod in errors.  Replacing is one
    transaction per family: no packet meets a half-written chain."""
    denies, probe_sources = list(denies), list(probe_sources)
    for family in families:
        saved = read(netns_fd, family, what)
        restore(netns_fd, family, what,
                install_script(family, ports, saved, denies, probe_sources))


def set_denies(netns_fd: int, what: str, denies: Iterable[DenyRule],
               families: Sequence[Family] = FAMILIES) -> None:
    denies = list(denies)
    for family in families:
        restore(netns_fd, family, what, deny_script(family, denies))


def remove(netns_fd: int, what: str, families: Sequence[Family] = FAMILIES) -> None:
    """Remove our jumps and chains of every family (idempotent), then drop the tables
    that removing them left empty.  Every family is tried; the first failure is raised."""
    problems: list[IptablesError] = []
    for family in families:
        try:
            saved = read(netns_fd, family, what)
            script = removal_script(saved)
            if script:
                restore(netns_fd, family, what, script)
            if saved.nf_tables and shutil.which("nft"):
                for table in tables_left_empty(saved):
                    _run(netns_fd, ["nft", "delete", "table", family.nft_family, table], what)
        except IptablesError as e:
            problems.append(e)
    if problems:
        raise problems[0]


def installed_chains(netns_fd: int, what: str, family: Family) -> dict[str, list[str]]:
    """Our chains in the netns and their rules (for tests and diagnostics)."""
    saved = read(netns_fd, family, what)
    chains: dict[str, list[str]] = {}
    for state in saved.tables.values():
        for name in _ours(state):
            chains[name] = [r.split(" ", 1)[1] for r in state.rules
                            if r.split(" ", 1)[0] == name]
    return chains
