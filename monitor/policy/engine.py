"""Evaluate a compiled policy against what agents do, and say which rules they broke.

A pure function of (Policy, event facts, CPU samples) to Verdicts, in rule file order, each
with a human reason ("ssh requests remote_forward", "connect to 1.2.3.4:3333 (port in
@mining_ports)"). The caller passes time in; CpuWindows is the only state, and the caller
owns it. Verdicts are level-triggered: the same condition gives the same verdict on every
call, so whoever acts on them (enforcer, alerts) de-duplicates by (rule, session, pid).

This module must never parse policy text, read files, /proc or the clock, send signals, or
log: it runs on the hot path (a few microseconds per event) and is replayed on recordings.
"""

from __future__ import annotations

import functools
import ipaddress
import os.path
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from monitor.model.address import fold
from monitor.model.cmdline import comm_of, file_name
from monitor.policy.identity import NO_HOST_BINARIES, SSH, HostBinaries, short_hash
from monitor.policy.sshargs import possible_features, requested_features
from monitor.policy.types import (
    Action,
    Address,
    ConnectMatch,
    EventKind,
    ExecMatch,
    Mode,
    Policy,
    ProcessesMatch,
    Rule,
    span_text,
)


@dataclass(frozen=True)
class Verdict:
    """One rule broken by one agent process (or session: pid 0 when no process is meant)."""

    rule: str
    action: Action
    mode: Mode
    agent: str
    session: int
    pid: int
    reason: str
    exe: str | None = None
    argv: tuple[str, ...] | None = None
    destination: str | None = None  # "1.2.3.4:443", "[2001:db8::1]:443"
    cpu_cores: float | None = None
    processes: int | None = None
    loader: str | None = None  # the interpreter an exec ran its program through
    sha256: str | None = None  # the executable's content, when the exec was fingerprinted


# --- exec --------------------------------------------------------------------------------


def is_ssh_exec(exe: str, comm: str, argv: Sequence[str]) -> bool:
    """Whether an exec is ssh by name: its executable, comm or argv[0] is named ssh
    (endswith first: this runs for every tracked exec)."""
    return comm == "ssh" or exe.endswith("ssh") and os.path.basename(exe) == "ssh" or (
        bool(argv) and argv[0].endswith("ssh") and os.path.basename(argv[0]) == "ssh")


def wants_ssh_config(policy: Policy, host: HostBinaries, *, agent: str | None, exe: str,
                     comm: str, argv: Sequence[str], line: str | None = None,
                     sha256: str | None = None) -> bool:
    """Whether what ssh's config files request could change a verdict on this exec: it is
    ssh (by name, or a copy of the host's ssh by content), some exec rule with an `ssh:`
    condition applies to the agent (every rule when the agent is not known yet) and asks
    about a feature the command line does not request already, and (in enforce mode) the
    command line alone does not already break a kill or kill-agent rule. Reading the configs
    costs about half a millisecond of file reads (docs/benchmarks.md): an `ssh -R` that its
    command line already condemns is killed without waiting for them (what its config adds
    could only add an alert to a process that dies anyway)."""
    facts = _ExecFacts(exe, comm, argv, line, sha256=sha256, host=host)
    if not (is_ssh_exec(exe, comm, argv) or SSH in facts.copy_of):
        return False
    rules = [r for r in policy.rules_for(EventKind.EXEC)
             if isinstance(r.match, ExecMatch) and r.match.ssh
             and (agent is None or policy.applies(r, agent))]
    if policy.mode == Mode.ENFORCE and any(
            r.action in (Action.KILL, Action.KILL_AGENT) and isinstance(r.match, ExecMatch)
            and _exec_reason(r.match, facts) is not None for r in rules):
        return False
    asked = facts.ssh
    return any(isinstance(r.match, ExecMatch) and not r.match.ssh & asked for r in rules)


class _ExecFacts:
    """One exec, with what several rules need computed once.

    `line`, when given, is the whole command line and argv only a clip of it (a command line
    of more arguments than monitor.model.cmdline.SPLIT_MAX_ARGS): argv rules search the line, and
    ssh conditions count every feature an argument could request (sshargs.possible_features).
    `ssh_config` are the features ssh's config files request (monitor/sessions/sshconfig.py
    read them for this exec; None when not resolved), `ssh_config_from` where each came from.
    """

    def __init__(self, exe: str, comm: str, argv: Sequence[str],
                 line: str | None = None, fileless: bool = False, *,
                 ssh_config: frozenset[str] | None = None,
                 ssh_config_from: Sequence[tuple[str, str]] = (),
                 sha256: str | None = None, host: HostBinaries = NO_HOST_BINARIES,
                 real_exe: str | None = None) -> None:
        self.exe, self.comm, self.argv, self.fileless = exe, comm, argv, fileless
        self.real_exe = real_exe
        self.ssh_config = ssh_config or frozenset()
        self.ssh_config_from = ssh_config_from
        self.base = file_name(exe)
        self._base_comm: str | None = None
        self.sha256 = sha256
        self.copy_of = host.copy_of(sha256)  # {name: path} of host binaries it is a copy of
        self._line: str | None = line
        self._whole = line is None
        self._ssh: frozenset[str] | None = None

    @property
    def line(self) -> str:
        if self._line is None:
            self._line = " ".join(self.argv)
        return self._line

    @property
    def base_comm(self) -> str:
        """The file's name cut as the kernel cuts a comm (the probes look it up so)."""
        if self._base_comm is None:
            self._base_comm = self.base if self.base == self.comm else comm_of(self.base)
        return self._base_comm

    @property
    def ssh(self) -> frozenset[str]:
        if self._ssh is None:
            if not (is_ssh_exec(self.exe, self.comm, self.argv) or SSH in self.copy_of):
                self._ssh = frozenset()
            elif self._whole:
                self._ssh = requested_features(self.argv)
            else:
                self._ssh = possible_features(self.line)
        return self._ssh


def _exec_name(m: ExecMatch, f: _ExecFacts) -> str | None:
    """The rule name that the file's name or the comm is, as the kernel compares them: the
    file's whole name, the comm, or the file's name cut as a comm is."""
    if f.base in m.names:
        return f.base
    for comm in (f.comm, f.base_comm):
        if comm in m.comms:
            return next(n for n in sorted(m.names) if comm_of(n) == comm)
    return None


def _exec_reason(m: ExecMatch, f: _ExecFacts) -> str | None:
    parts = []
    if m.fileless is not None:
        if m.fileless != f.fileless:
            return None
        parts.append("fileless executable (a memfd, a deleted or O_TMPFILE file)"
                     if f.fileless else "executable on disk")
    if m.names:
        name = _exec_name(m, f)
        if name is None and not m.names.isdisjoint(f.copy_of):
            name = min(m.names.intersection(f.copy_of))
        if name is None:
            return None
        source = m.lists.get(("name", name))
        how = [f"name in {source}"] if source else []
        if name in f.copy_of and name not in (f.base, f.comm):
            how.append(f"same content as {f.copy_of[name]}")
        parts.append(f"runs {name} ({'; '.join(how)})" if how else f"runs {name}")
    if m.exe:  # the path exec was given, or the real path behind it ("./x", a symlink)
        found = next(((p, g) for g in m.exe for p in (f.exe, f.real_exe)
                      if p is not None and fnmatchcase(p, g)), None)
        if found is None:
            return None
        path, glob = found
        source = m.lists.get(("exe", glob))
        parts.append(f"executable {path} matches {source or glob}")
    if m.argv:
        regex = next((r for r in m.argv if r.search(f.line)), None)
        if regex is None:
            return None
        source = m.lists.get(("argv", regex.pattern))
        parts.append(f"command line matches {source or repr(regex.pattern)}")
    if m.ssh:
        asked = m.ssh & f.ssh
        configured = m.ssh & f.ssh_config - asked
        if not asked and not configured:
            return None
        copy = f.copy_of.get(SSH) if SSH not in (f.base, f.comm) else None
        who = f"ssh (same content as {copy})" if copy else "ssh"
        sources: dict[str, list[str]] = {}  # where -> features, so a reason is said once
        for x in sorted(configured):
            sources.setdefault(dict(f.ssh_config_from).get(x, "ssh config"), []).append(x)
        named = sorted(asked) + [f"{', '.join(xs)} (from {w})" for w, xs in sources.items()]
        parts.append(f"{who} requests {', '.join(named)}")
    if m.sha256:
        if f.sha256 not in m.sha256:
            return None
        source = m.lists.get(("sha256", f.sha256))
        parts.append(f"executable sha256 {short_hash(f.sha256)} "
                     f"{'in ' + source if source else 'is listed'}")
    return "; ".join(parts)


def match_exec(rule: Rule, agent: str, exe: str, comm: str, argv: Sequence[str],
               line: str | None = None, fileless: bool = False, *,
               ssh_config: frozenset[str] | None = None, sha256: str | None = None,
               host: HostBinaries = NO_HOST_BINARIES) -> bool:
    """Whether an exec by an agent of this name breaks rule (False for non-exec rules)."""
    if not isinstance(rule.match, ExecMatch) or not Policy.applies(rule, agent):
        return False
    facts = _ExecFacts(exe, comm, argv, line, fileless, ssh_config=ssh_config,
                       sha256=sha256, host=host)
    return _exec_reason(rule.match, facts) is not None


def evaluate_exec(policy: Policy, *, agent: str, session: int, pid: int, exe: str,
                  comm: str, argv: Sequence[str], line: str | None = None,
                  fileless: bool = False, loader: str | None = None,
                  ssh_config: frozenset[str] | None = None,
                  ssh_config_from: Sequence[tuple[str, str]] = (),
                  sha256: str | None = None, host: HostBinaries = NO_HOST_BINARIES,
                  real_exe: str | None = None) -> list[Verdict]:
    """Verdicts for one exec: exe is the real executable path, comm the kernel's name;
    line the whole command line when argv is only a clip of it (see _ExecFacts); fileless
    whether the executable has no links (a memfd, a deleted or O_TMPFILE file); loader the
    interpreter that runs exe (exe, comm and argv are then the program's); ssh_config the
    features ssh's config files request, ssh_config_from where from; sha256 the
    executable's content (None: not read) and host the fingerprints of the host binaries
    the policy names: a copy of one is that program (policy/identity.py); real_exe the
    absolute path behind exe with symlinks resolved, when exec named it otherwise."""
    facts = _ExecFacts(exe, comm, argv, line, fileless, ssh_config=ssh_config,
                       ssh_config_from=ssh_config_from, sha256=sha256, host=host,
                       real_exe=real_exe)
    verdicts = []
    for rule in policy.rules_for(EventKind.EXEC):
        if not isinstance(rule.match, ExecMatch) or not policy.applies(rule, agent):
            continue
        reason = _exec_reason(rule.match, facts)
        if reason is not None:
            if loader is not None:
                reason += f" via {loader}"
            verdicts.append(Verdict(rule.name, rule.action, policy.mode, agent, session, pid,
                                    reason, exe=exe, argv=tuple(argv), loader=loader,
                                    sha256=sha256))
    return verdicts


def argv_rules(policy: Policy, agent: str) -> list[str]:
    """Names of the exec rules for this agent that look at the command line (argv, ssh):
    the rules a command line cut short could slip past."""
    return [r.name for r in policy.rules_for(EventKind.EXEC)
            if isinstance(r.match, ExecMatch) and (r.match.argv or r.match.ssh)
            and policy.applies(r, agent)]


# --- connect -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)  # pure: the hot path sees the same few addresses
def destination_address(address: str) -> Address:
    """The destination as an address object, IPv4-mapped IPv6 folded into IPv4 (so its
    family is the destination's, whatever the socket's)."""
    if ":" not in address:
        return ipaddress.IPv4Address(address)
    if address[:7].lower() == "::ffff:" and "." in address:  # the decoder's mapped form
        return ipaddress.IPv4Address(address[7:])
    return fold(ipaddress.ip_address(address))


def format_destination(ip: Address, port: int) -> str:
    return f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"


def _connect_reason(m: ConnectMatch, ip: Address, port: int) -> str | None:
    if m.family is not None and m.family != ("ipv4" if ip.version == 4 else "ipv6"):
        return None
    span = m.port_range_for(port) if m.ports else None
    if span is None and m.ports and not m.outside:
        return None  # the cheap test first: most connects are to ports no rule names
    net = m.network_for(ip) if m.networks else None
    inside = (net is not None or not m.networks) and (span is not None or not m.ports)
    if m.outside:
        if inside:
            return None
        return "outside the allowed destinations"
    if not inside:
        return None
    parts = []
    if net is not None:
        parts.append(f"address in {m.lists.get(('address', str(net))) or net}")
    if span is not None:
        text = span_text(span)
        source = m.lists.get(("port", text))
        parts.append(f"port in {source or text}" if source or span[0] != span[1]
                     else f"port {text}")
    if not parts:
        parts.append(f"family {m.family}")
    return ", ".join(parts)


def match_connect(rule: Rule, agent: str, family: int, address: str, port: int) -> bool:
    """Whether a connect by an agent of this name breaks rule (False for other rules).

    address is as the kernel decoder prints it ('1.2.3.4', '::1', '::ffff:1.2.3.4').
    family (2 or 10) is the socket's; what a rule's `family:` compares is the
    destination's, read from the address after IPv4-mapped normalisation.
    """
    if not isinstance(rule.match, ConnectMatch) or not Policy.applies(rule, agent):
        return False
    return _connect_reason(rule.match, destination_address(address), port) is not None


def connect_what(send: bool) -> str:
    """How a verdict's reason names the step: a connect, or a datagram sent with an
    address (sendto, sendmsg, ...), which the same connect rules judge."""
    return "datagram to" if send else "connect to"


def evaluate_connect(policy: Policy, *, agent: str, session: int, pid: int, family: int,
                     address: str, port: int, send: bool = False) -> list[Verdict]:
    """Verdicts for one connect, or for one datagram sent with a destination when send is
    true (arguments as for match_connect). Raises ValueError if address is not an IP
    address."""
    rules = policy.rules_for(EventKind.CONNECT)
    if not rules:
        return []
    ip = destination_address(address)
    verdicts = []
    for rule in rules:
        if not isinstance(rule.match, ConnectMatch) or not policy.applies(rule, agent):
            continue
        reason = _connect_reason(rule.match, ip, port)
        if reason is not None:
            where = format_destination(ip, port)
            verdicts.append(Verdict(rule.name, rule.action, policy.mode, agent, session, pid,
                                    f"{connect_what(send)} {where} ({reason})",
                                    destination=where))
    return verdicts


# --- processes ---------------------------------------------------------------------------


def evaluate_processes(policy: Policy, *, agent: str, session: int, live: int,
                       pid: int = 0) -> list[Verdict]:
    """Verdicts for the number of live processes in one session; pid is the process whose
    fork made the count (0 if unknown), the one a `kill` action would kill."""
    verdicts = []
    for rule in policy.rules_for(EventKind.PROCESSES):
        m = rule.match
        if isinstance(m, ProcessesMatch) and policy.applies(rule, agent) and live > m.above:
            verdicts.append(Verdict(rule.name, rule.action, policy.mode, agent, session, pid,
                                    f"{live} live processes in the session (more than "
                                    f"{m.above})", processes=live))
    return verdicts
