"""The running monitor: probes + decoder + tracker + agent recognition + control socket.

Owns the one event loop. Order at start: attach the probes (from then on the kernel tracks
every child of a tracked process), install the in-kernel matchers, then adopt the agent
trees that were already running (scan /proc twice, so a fork during the first scan is
caught by the second). It never signals a process: enforcement lives elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from traceback import format_exception
from typing import IO, Any

from monitor.config.types import Config
from monitor.enforce.enforcer import Enforcer, KillOutcome
from monitor.enforce.judge import Judge
from monitor.kernel.abi import DecodeError, decode
from monitor.kernel.loader import Probes
from monitor.model import cmdline, events
from monitor.model.agents import ProcessFacts, merged_agents
from monitor.model.errors import ConfigError, ControlError, EnvironmentProblem
from monitor.model.events import (
    ConnectEvent,
    Event,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    Setting,
    VerdictEvent,
    VerdictKind,
)
from monitor.observe.auditlog import AuditLog, SinkStats
from monitor.observe.metrics import (
    AgentUsage,
    MetricsState,
    PolicyInfo,
    connect_verdict,
    kernel_connect_verdict,
    rule_verdict,
    usage_of,
)
from monitor.observe.notifier import Notifier
from monitor.observe.output import record
from monitor.policy.engine import Verdict, argv_rules
from monitor.policy.kernel_tables import (
    KernelTables,
    compile_kernel,
    connects_need_decisions,
    kernel_matchers,
    wake_mask,
)
from monitor.policy.load import check_capacity, load_policy_text
from monitor.policy.types import Action, FailClosed, Mode, Policy
from monitor.service.control import ControlServer, Peer, Subscribers
from monitor.service.sdnotify import SystemdNotifier
from monitor.sessions import completion
from monitor.sessions.procfs import ProcFS, ProcInfo, plan_adoption
from monitor.sessions.tracker import Process, Session, Tracker

Sink = Callable[[Event, str], None]


UNCONFIRMED_LOG_SECONDS = 10.0
BURST_GAP_SECONDS = 0.002
BATCH_SECONDS = 0.001


class AgentTable:
    """Agent names by the index the kernel stores; config agents first, then ad-hoc ones."""

    def __init__(self, names: list[str]) -> None:
        self._names = list(names)
        self.on_new: Callable[[], None] | None = None

    def name(self, idx: int) -> str:
        return self._names[idx] if 0 <= idx < len(self._names) else f"agent-{idx}"

    def index(self, name: str) -> int:
        if name not in self._names:
            self._names.append(name)
            if self.on_new is not None:
                self.on_new()
        return self._names.index(name)

    def names(self) -> list[str]:
        return list(self._names)


AUDITED = frozenset({"verdict", "killswitch", "policy reloaded", "policy reload refused"})


class JsonLog:
    """Structured log lines (one JSON object each) for stdout / journald; verdicts, kills
    and policy changes also go to the audit log (JSON lines, rotated; monitor/observe/auditlog.py
    keeps them through a full disk) when one is set."""

    def __init__(self, stream: IO[str] | None = None, audit_path: str = "",
                 audit_bytes: int = 10 * 1024 * 1024, audit_keep: int = 5) -> None:
        self.stream = stream or sys.stdout
        self._lock = threading.RLock()  # the audit log reports its trouble through here
        self.audit: AuditLog | None = None
        if audit_path:
            self.audit = AuditLog(audit_path, max_bytes=audit_bytes, keep=audit_keep,
                                  report=self)
            try:
                self.audit.open()
            except OSError as e:
                raise EnvironmentProblem(f"cannot open the audit log {audit_path}: "
                                         f"{e.strerror}; fix monitor.audit_log") from None

    def __call__(self, msg: str, level: str = "info", **fields: Any) -> None:
        line = json.dumps({"ts": round(time.time(), 6), "level": level, "msg": msg, **fields},
                          default=str)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()
            if self.audit is not None and msg in AUDITED:
                self.audit.write(line)

    def close(self) -> None:
        if self.audit is not None:
            self.audit.close()


class Monitor:
    def __init__(self, config: Config, policy: Policy | None = None, *,
                 probes: Probes | None = None, procfs: ProcFS | None = None,
                 sink: Sink | None = None, log: Callable[..., None] | None = None,
                 control_path: str | None = None) -> None:
        self.config = config
        self.policy = policy or load_policy_text("mode: monitor\n", "<no policy>")
        self.specs = merged_agents(config, self.policy)
        check_capacity(config, self.policy)
        self.probes = probes or Probes()
        self.procfs = procfs or ProcFS()
        self.sink = sink
        self.log = log or JsonLog(audit_path=config.monitor.audit_log)
        self.sd = SystemdNotifier()
        self.reload_requested = threading.Event()
        self.reloader: Callable[[], tuple[Config, Policy]] | None = None
        self._latched: set[str] = set()  # agent names, "*" = every agent
        self.control_path = control_path
        self.agents = AgentTable([a.name for a in self.specs])
        self.agents.on_new = self._save_agents
        self.tracker = Tracker(self.agents.name, history=config.monitor.history,
                               max_processes=config.monitor.max_processes)
        self.metrics = MetricsState(self.agents.names())  # configured agents label first
        self._connect_verdicts: dict[int, str] = {}  # tid -> kernel verdict, connect in flight
        self._unconfirmed_said: dict[str, tuple[float | None, int]] = {}  # agent -> last log
        self.tables = compile_kernel(self.policy)
        self.enforcer = Enforcer(self.probes, self.procfs, self._excluded)
        self.notifier = Notifier(config.alerts, log=self.log)
        self.judge = Judge(self.policy, self.tables, self.enforcer, self.tracker,
                           self._verdict_log,
                           metrics=self.metrics,
                           alerts=self.notifier)
        self.subscribers = Subscribers()
        self.lock = threading.RLock()
        self.events = 0
        self.decode_errors = 0
        self._next_session = 1
        self._control: ControlServer | None = None
        self.gen = 0
        self._userspace_matchers = any(not m.in_kernel for a in self.specs
                                       for m in a.matchers)
        self.cgroup: str | None = None
        # reconciliation with the kernel's process map (tick)
        self._absent: set[int] = set()
        self._lost_seen = 0
        self._recheck = False
        self._pending_seen: set[int] = set()

    def _verdict_log(self, msg: str, level: str = "info", **fields: Any) -> None:
        """The judge's log lines; verdicts also stream to subscribers (agentwatch top)."""
        self.log(msg, level=level, **fields)
        if msg == "verdict" and self.subscribers:
            self.subscribers.send(json.dumps({"event": "policy_verdict", **fields},
                                             default=str, separators=(",", ":")))

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self.notifier.start()
        self.probes.open()
        self.gen = 0
        self.probes.install_rules(self.tables, self.agents.names(), self.gen)
        self._policy_settings(self.policy, self.tables)
        # connect events and connect rules both come from these hooks: no hooks, no monitor
        self.cgroup = self.probes.attach_cgroup()
        self.probes.release_compiler()  # every program is loaded: LLVM is done
        if self.tables.userspace_only:
            self.log("more kernel-enforceable rules than the kernel holds; these are "
                     "evaluated in userspace", level="warning",
                     rules=[r.name for r in self.tables.userspace_only])
        self.install_matchers()
        self.probes.on_record(self._on_record)
        self.recover()
        self.adopt_running()
        if self.control_path:
            self._control = ControlServer(self.control_path, {
                "ping": lambda req, peer: {"ok": True, "pid": os.getpid()},
                "register": self._op_register,
                "status": lambda req, peer: {"ok": True, **self.status()},
                "killswitch": self._op_killswitch,
                "reload": self._op_reload,
            }, self.subscribers, log=self.log)
            self._control.start()
        self.log("monitor started", probes=self.probes.attached,
                 probes_expected=self.probes.expected,
                 agents=self.agents.names(), sessions=len(self.tracker.sessions()),
                 control_socket=self.control_path, policy=self.policy.source,
                 policy_sha256=self.policy.sha256, mode=self.policy.mode.value,
                 rules=len(self.policy.rules), kernel_rules=len(self.tables.rules),
                 cgroup=self.cgroup)

    def stop(self) -> None:
        self.sd.stopping()
        if self._control is not None:
            self._control.stop()
            self._control = None
        self.probes.close()
        self.notifier.close()
        self.log("monitor stopped", events=self.events)
        if isinstance(self.log, JsonLog):
            self.log.close()  # the audit log's last try at what the disk refused

    def run(self, stop: threading.Event) -> None:
        tick = self.config.monitor.tick_seconds
        next_tick = time.monotonic() + tick
        self.sd.ready(self._status_line())
        last = 0.0
        while not stop.is_set():
            # Records that may need a userspace kill wake this at once; the others at most
            # every 50 ms (probes: wake_flags, Setting.WAKE), else the timeout reads them.
            self.probes.poll(100)
            now = time.monotonic()
            if now - last < BURST_GAP_SECONDS:
                # Woken again right away: a burst (a tracked fork+exec loop wakes this at
                # every exec). Let records gather for a moment instead of taking one wakeup
                # each: the wakeups, not the work, slowed such a loop 1.1-1.3x on these
                # 2-vCPU VMs (docs/benchmarks.md). Costs an event at most BATCH_SECONDS.
                time.sleep(BATCH_SECONDS)
            last = now
            self.sd.watchdog(now)  # from the loop itself: a stuck loop stops pinging
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload_from_files()
            if now >= next_tick:
                self.tick()
                self.sd.status(self._status_line())
                next_tick = now + tick

    def _status_line(self) -> str:
        sessions = self.tracker.sessions()
        kills = sum(self.judge.kills.values())
        return (f"{self.policy.mode.value}: {len(sessions)} agent sessions, "
                f"{sum(len(s.processes) for s in sessions)} processes, {kills} kills, "
                f"policy {self.policy.sha256[:12]}")

    # --- reload --------------------------------------------------------------------------

    def reload_from_files(self) -> bool:
        """SIGHUP: load config and policy again; a bad one is refused and the old stays."""
        if self.reloader is None:
            return False
        self.sd.reloading()
        start = time.monotonic()
        try:
            config, policy = self.reloader()
        except (ConfigError, EnvironmentProblem) as e:
            return self._reload_refused(str(e), start)
        except Exception as e:  # a bug, not bad input: see below
            # Not bad input (the loaders raise ConfigError for any file): a bug in loading,
            # which changes nothing. Logged with its traceback and counted as refused; the
            # running policy stays in force: a reload must never take the monitor (and
            # every probe with it) down.
            return self._reload_refused(f"internal error {type(e).__name__}: {e!s:.200}",
                                        start, traceback="".join(format_exception(e)[-8:]))
        try:
            self.reload(config, policy)
        except (ConfigError, EnvironmentProblem) as e:
            return self._reload_refused(str(e), start)
        self.metrics.observe_reload(True, time.monotonic() - start)
        self.sd.ready(self._status_line())
        return True

    def _reload_refused(self, reason: str, start: float, **fields: object) -> bool:
        self.metrics.observe_reload(False, time.monotonic() - start)
        self.log("policy reload refused", level="error", reason=reason,
                 kept=self.policy.sha256, **fields)
        self.sd.ready(self._status_line())
        return False

    def reload(self, config: Config, policy: Policy) -> None:
        """Swap in a new config and policy at once: the kernel rule and matcher maps are
        written into the idle generation and flipped in one word write."""
        specs = merged_agents(config, policy)
        check_capacity(config, policy)
        tables = compile_kernel(policy)
        with self.lock:
            for spec in specs:
                self.agents.index(spec.name)
            gen = 1 - self.gen
            self.probes.install_rules(tables, self.agents.names(), gen)
            comms, uids = kernel_matchers(specs, self.agents.index)
            self.probes.set_matchers(comms, uids, gen)
            self.probes.flip(gen)
            self._policy_settings(policy, tables)
            self.gen = gen
            old = self.policy.sha256
            self.config, self.policy, self.specs, self.tables = config, policy, specs, tables
            self._userspace_matchers = any(not m.in_kernel for a in specs for m in a.matchers)
            self.probes.set_setting(Setting.EXEC_CANDIDATES,
                                    1 if self._userspace_matchers else 0)
            self.judge.use(policy, tables)
        self.log("policy reloaded", previous=old, policy=policy.source, policy_sha256=policy.sha256,
                 mode=policy.mode.value, rules=len(policy.rules), kernel_rules=len(tables.rules))

    def _policy_settings(self, policy: Policy, tables: KernelTables) -> None:
        """The probes' policy-wide switches: which records wake the monitor, whether
        connect records may carry a verdict, and fail-closed."""
        self.probes.set_setting(Setting.WAKE, wake_mask(policy, tables))
        self.probes.set_setting(Setting.CONNECT_DECIDE,
                                1 if connects_need_decisions(policy, tables) else 0)
        self.probes.set_setting(Setting.FAIL_CLOSED,
                                1 if policy.fail_closed == FailClosed.KILL else 0)

    def _op_reload(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        ok = self.reload_from_files()
        return {"ok": ok, "policy_sha256": self.policy.sha256} if ok else {
            "ok": False, "error": "reload refused: see the monitor's log (the old policy stays)"}

    # --- kill switch ---------------------------------------------------------------------

    def killswitch(self, agent: str | None, latch: bool = False, release: bool = False,
                   requested_by: str = "") -> dict[str, Any]:
        """Kill every process of every (or one) agent now; `latch` keeps killing any new
        agent process until released. Works in monitor mode too: it is the operator's."""
        names = self.agents.names()
        if agent is not None and agent not in names:
            raise ControlError(f"unknown agent {agent!r} (known: {', '.join(names) or 'none'})")
        key = agent or "*"
        index = None if agent is None else self.agents.index(agent)
        if release:
            self.probes.latch(index, False)
            self._latched.discard(key)
            self.log("killswitch", agent=key, action="release", requested_by=requested_by)
            return {"released": key, "latched": sorted(self._latched)}
        if latch:
            self.probes.latch(index, True)
            self._latched.add(key)
        with self.lock:
            targets = [(s.id, list(s.processes)) for s in self.tracker.sessions()
                       if agent is None or s.agent == agent]
        killed = 0
        for sid, known in targets:
            results = self.enforcer.kill_session(sid, known, manual=True)
            killed += sum(1 for r in results if r.outcome == KillOutcome.KILLED)
        outcome = f"{len(targets)} agent sessions killed ({killed} processes signalled)"
        self.log("killswitch", agent=key, action="latch" if latch else "kill",
                 sessions=[t[0] for t in targets], killed=killed, requested_by=requested_by)
        self.metrics.observe_killswitch(agent or "all")
        self.notifier.kill_switch(agent=key, outcome=outcome, requested_by=requested_by,
                                  reason="manual kill switch" + (" (latched)" if latch else ""))
        return {"sessions": len(targets), "killed": killed, "latched": sorted(self._latched)}

    def latched(self, agent: str) -> bool:
        return "*" in self._latched or agent in self._latched

    def _op_killswitch(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        agent = req.get("agent")
        if agent is not None and not isinstance(agent, str):
            return {"ok": False, "error": "killswitch: 'agent' must be a string"}
        flags = {k: req.get(k, False) for k in ("latch", "release")}
        if not all(isinstance(v, bool) for v in flags.values()):
            return {"ok": False, "error": "killswitch: 'latch' and 'release' must be booleans"}
        if flags["latch"] and flags["release"]:
            return {"ok": False, "error": "killswitch: give --latch or --release, not both"}
        try:
            result = self.killswitch(agent, flags["latch"], flags["release"],
                                     requested_by=f"pid {peer.pid}")
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, **result}

    # --- recovery ------------------------------------------------------------------------

    def _agents_file(self) -> Path:
        return Path(self.config.monitor.control_socket).parent / "agents.json"

    def _save_agents(self) -> None:
        if self.config.monitor.pin_dir:
            path = self._agents_file()
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.agents.names()))
            os.replace(tmp, path)

    def recover(self) -> int:
        """After a restart with pinned probes: rebuild the sessions from the kernel's
        process map, which the probes kept up to date while no monitor ran (children born
        in the gap included). Returns the processes recovered."""
        if not self.config.monitor.pin_dir:
            return 0
        entries = self.probes.tracked()
        if not entries:
            self._save_agents()
            return 0
        try:
            for name in json.loads(self._agents_file().read_text()):
                self.agents.index(str(name))
        except (OSError, ValueError):
            pass  # config/policy agents keep their order; others show as agent-N
        by_session: dict[int, list[Any]] = {}
        for e in entries:
            by_session.setdefault(e.session, []).append(e)
        recovered = 0
        with self.lock:
            for sid, procs in by_session.items():
                if procs[0].agent == events.AGENT_PENDING:
                    recovered += self._decide_pending(sid, procs)
                    continue
                pids = {e.pid for e in procs}
                procs.sort(key=lambda e: e.start_ns)
                root = next((e for e in procs if e.ppid not in pids), procs[0])
                self.tracker.start_session(sid, self.agents.name(root.agent), root.pid,
                                           root.start_ns)
                for e in procs:
                    info = self.procfs.read(e.pid)
                    if info is None:
                        self.probes.untrack(e.pid)
                        continue
                    proc = self.tracker.add_process(sid, e.pid, e.ppid, comm=info.comm,
                                                    exe=info.exe, argv=info.argv,
                                                    uid=info.uid, start_ns=e.start_ns)
                    proc.cpu_ns = e.cpu_ns
                    recovered += 1
                    # what it exec'd while no monitor read the ring is judged now
                    self.judge.on_running(proc, self.agents.name(root.agent))
                if not sid & events.SESSION_KERNEL_BIT:
                    self._next_session = max(self._next_session, sid + 1)
        self._save_agents()
        self.log("recovered agent sessions from the pinned probes",
                 sessions=len(self.tracker.sessions()), processes=recovered)
        return recovered

    def tick(self) -> None:
        """Read what the kernel sums (CPU time per process) into the tracker, and make the
        tracker agree with the kernel's process map where records were lost."""
        self.probes.beat(self.config.monitor.fail_closed_seconds)
        readings = self.probes.cpu_readings()
        lost = self.probes.counters().get(events.Counter.LOST, 0)
        with self.lock:
            self.tracker.set_cpu(readings)
            self._reconcile({pid for pid, _ in readings}, lost)
            self.judge.on_tick()

    def _reconcile(self, live: set[int], lost: int) -> None:
        """The kernel's process map is the truth. A process the tracker holds that the map
        has not held for two ticks in a row exited without an exit record: forgotten. After
        the kernel lost records, every process the map holds that the tracker lacks is
        taken from /proc and judged (its fork or exec record was lost), and a pending
        candidate whose deciding exec was lost is decided from /proc."""
        gone = {p.pid for p in self.tracker.processes() if p.pid not in live}
        now = time.monotonic_ns()
        for pid in gone & self._absent:
            self.tracker.forget(pid, now)
        self._absent = gone
        if lost == self._lost_seen and not self._recheck:
            return
        self._lost_seen, self._recheck = lost, False
        pending: dict[int, list[Any]] = {}
        for e in self.probes.tracked():
            if self.tracker.process(e.pid) is not None:
                continue
            if e.agent == events.AGENT_PENDING:
                pending.setdefault(e.session, []).append(e)
                continue
            info = self.procfs.read(e.pid)
            if info is None:  # exiting: the map drops it
                continue
            agent = self.agents.name(e.agent)
            session = self.tracker.start_session(e.session, agent, e.pid, e.start_ns)
            proc = self.tracker.add_process(e.session, e.pid, e.ppid, comm=info.comm,
                                            exe=info.exe, argv=info.argv, uid=info.uid,
                                            start_ns=e.start_ns)
            self.judge.on_running(proc, session.agent)
        for sid, procs in pending.items():
            if sid in self._pending_seen:  # pending two ticks running: its exec was lost
                self._decide_pending(sid, procs)
            else:
                self._recheck = True  # its exec record may still be on its way: next tick
        self._pending_seen = set(pending) - self._pending_seen

    def _decide_pending(self, sid: int, procs: Sequence[Any]) -> int:
        """A pending candidate session whose deciding exec record never came (lost, or
        written while no monitor ran): recognise its oldest live process from /proc, then
        accept the session (and judge its processes) or untrack it. Returns processes kept."""
        procs = sorted(procs, key=lambda e: e.start_ns)
        infos = [(e, self.procfs.read(e.pid)) for e in procs]
        live = [(e, i) for e, i in infos if i is not None]
        agent = None
        excluded = self._excluded()
        for e, info in live:
            if e.pid not in excluded:
                agent = self._recognise(info)
                if agent is not None:
                    break
        if agent is None or not live:
            for e in procs:
                self.probes.untrack_if(e.pid, sid)
            return 0
        idx = self.agents.index(agent)
        root = live[0][0]
        self.tracker.start_session(sid, agent, root.pid, root.start_ns)
        self.log("agent session started", agent=agent, session=sid, root_pid=root.pid,
                 via="userspace match (from /proc: its exec record was lost)")
        for e, info in live:
            self.probes.retag(e.pid, idx)
            proc = self.tracker.add_process(sid, e.pid, e.ppid, comm=info.comm, exe=info.exe,
                                            argv=info.argv, uid=info.uid, start_ns=e.start_ns)
            self.judge.on_running(proc, agent)
        return len(live)

    # --- recognition -------------------------------------------------------------------

    def install_matchers(self) -> None:
        comms, uids = kernel_matchers(self.specs, self.agents.index)
        self.probes.set_matchers(comms, uids, self.gen)
        self.probes.flip(self.gen)
        self.probes.set_setting(Setting.EXEC_CANDIDATES, 1 if self._userspace_matchers else 0)

    def _facts(self, info: ProcInfo) -> ProcessFacts:
        return ProcessFacts(info.pid, info.comm, info.exe, info.argv, info.uid, info.cgroup,
                            line=info.line if info.argv_clipped else None)

    def _recognise_facts(self, facts: ProcessFacts) -> str | None:
        for spec in self.specs:
            if spec.matches(facts):
                return spec.name
        return None

    def _recognise(self, info: ProcInfo) -> str | None:
        return self._recognise_facts(self._facts(info))

    def _excluded(self) -> set[int]:
        """The monitor and its ancestors: never adopted, never killed."""
        out, pid = set(), os.getpid()
        while pid > 0 and pid not in out:
            out.add(pid)
            info = self.procfs.read(pid)
            pid = info.ppid if info else 0
        return out

    def new_session_id(self) -> int:
        with self.lock:
            sid = self._next_session
            self._next_session += 1
        return sid

    def adopt_running(self) -> int:
        """Track agent trees that started before the monitor; returns processes adopted."""
        exclude = self._excluded()
        adopted = 0
        with self.lock:
            known = {p.pid for p in self.tracker.processes()}  # recovered: judged already
            sessions: dict[int, int] = {}  # root pid -> session id
            for a in plan_adoption(self.procfs.scan(), self._recognise, exclude):
                if a.pid == a.root_pid:
                    sessions[a.pid] = self.new_session_id()
                sid = sessions[a.root_pid]
                root = a.pid == a.root_pid
                if self._adopt(a.pid, a.ppid, sid, a.agent, a.start_ticks, root=root):
                    adopted += 1
            adopted += self._adopt_stragglers(exclude)
            # what they run now was exec'd while nothing judged it: judge it as an exec
            for proc in [p for p in self.tracker.processes() if p.pid not in known]:
                session = self.tracker.session(proc.session)
                if session is not None:
                    self.judge.on_running(proc, session.agent)
        return adopted

    def _adopt(self, pid: int, ppid: int, sid: int, agent: str, start_ticks: int,
               root: bool) -> bool:
        idx = self.agents.index(agent)
        self.probes.track(pid, sid, idx, 0 if root else ppid)
        info = self.procfs.read(pid)
        if info is None or info.start_ticks != start_ticks:
            self.probes.untrack(pid)  # gone, or the pid was recycled under us
            return False
        if root:
            self.tracker.start_session(sid, agent, pid, time.monotonic_ns())
        elif self.tracker.session(sid) is None:
            self.probes.untrack(pid)
            return False
        self.tracker.add_process(sid, pid, 0 if root else ppid, comm=info.comm,
                                 exe=info.exe, argv=info.argv, uid=info.uid)
        return True

    def _adopt_stragglers(self, exclude: set[int]) -> int:
        """Children forked by a tracked process before its map entry existed."""
        adopted = 0
        for _ in range(3):
            found = 0
            infos = self.procfs.scan()
            for pid in sorted(infos, key=lambda p: infos[p].start_ticks):
                info = infos[pid]
                parent = self.tracker.process(info.ppid)
                if parent is None or pid in exclude or self.tracker.process(pid):
                    continue
                sess = self.tracker.session(parent.session)
                if sess and self._adopt(pid, info.ppid, parent.session, sess.agent,
                                        info.start_ticks, root=False):
                    found += 1
            adopted += found
            if not found:
                break
        return adopted

    def register(self, pid: int, agent: str,
                 still_peer: Callable[[], bool] | None = None) -> Session:
        """Make `pid` the root of a new session of `agent` (agentwatch exec).

        still_peer: whether `pid` still names the process that asked (control.Peer.alive);
        asked after /proc was read, so what was read is the asker's, not a process that
        got its pid after it exited (the adoption then re-checks the start time)."""
        with self.lock:
            known = self.tracker.process(pid)
            sess = self.tracker.session(known.session) if known else None
            if sess is not None and self.probes.is_tracked(pid):
                # (a pid still in a pending candidate session is not an agent yet: allowed)
                raise ControlError(f"process {pid} is already tracked as part of agent "
                                   f"{sess.agent!r}")
            if pid in self._excluded():
                raise ControlError(f"process {pid} is the monitor or one of its ancestors")
            if self.latched(agent):
                raise ControlError(f"the kill switch is latched for {agent!r}: release it "
                                   "with `agentwatch killswitch --release` first")
            info = self.procfs.read(pid)
            if info is None:
                raise ControlError(f"process {pid} is gone")
            if still_peer is not None and not still_peer():
                raise ControlError(f"process {pid} exited before it was registered (its pid "
                                   "may name another process now): nothing registered")
            sid = self.new_session_id()
            if not self._adopt(pid, info.ppid, sid, agent, info.start_ticks, root=True):
                raise ControlError(f"process {pid} exited while being registered")
            session = self.tracker.session(sid)
            assert session is not None
        self.log("agent session started", agent=agent, session=sid, root_pid=pid,
                 via="agentwatch exec")
        return session

    def _op_register(self, req: dict[str, Any], peer: Peer) -> dict[str, Any]:
        agent = req.get("agent")
        if not isinstance(agent, str) or not agent or len(agent) > 63 or \
                not agent.isprintable():
            return {"ok": False, "error": "register needs 'agent': a name of 1-63 printable "
                                          "characters"}
        try:
            s = self.register(peer.pid, agent, still_peer=peer.alive)
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "session": s.id, "pid": peer.pid}

    # --- events ------------------------------------------------------------------------

    def _on_record(self, raw: bytes) -> None:
        try:
            ev = decode(raw)
        except DecodeError as e:
            self.decode_errors += 1
            self.log("undecodable event", level="error", reason=str(e))
            return
        self.handle(ev)

    def handle(self, ev: Event) -> None:
        self.events += 1
        with self.lock:
            unconfirmed = None
            if isinstance(ev, ExecEvent) and ev.h.session and completion.needs_proc(ev):
                ev, unconfirmed = completion.complete(ev, self.procfs.read(ev.h.pid))
            if ev.h.agent == events.AGENT_PENDING:
                ev = self._settle_pending(ev)
            proc = self.tracker.apply(ev)
            agent = self.agents.name(ev.h.agent) if ev.h.session else ""
            if isinstance(ev, ExecEvent) and ev.flags & events.FLAG_NEW_ROOT:
                self.log("agent session started", agent=agent, session=ev.h.session,
                         root_pid=ev.h.pid, exe=ev.filename, via="kernel match")
            if ev.h.session:
                session = self.tracker.session(ev.h.session)
                if session is not None:
                    agent = session.agent
                acted = self.judge.on_event(ev, agent, proc)
                self._observe(ev, agent, proc, acted)
                if unconfirmed is not None and isinstance(ev, ExecEvent):
                    self._argv_unconfirmed(ev, agent, unconfirmed)
                if isinstance(ev, ExitEvent) and session is None:
                    self.probes.undoom(ev.h.session)
                    self.judge.forget_session(ev.h.session)
        if proc is None and not self.probes.options.trace_all:
            return
        if isinstance(ev, ExecEvent):
            ev = completion.kept(ev)
        if self.sink is not None:
            self.sink(ev, agent)
        if self.subscribers:
            self.subscribers.send(json.dumps(record(ev, agent), separators=(",", ":")))

    def _argv_unconfirmed(self, ev: ExecEvent, agent: str, reason: str) -> None:
        """A cut argv /proc could not confirm was judged on the probes' copy: count it, and
        say so when rules that read the command line apply (once per agent per
        UNCONFIRMED_LOG_SECONDS, with how many went unsaid since)."""
        self.metrics.observe_argv_unconfirmed(agent, reason)
        rules = argv_rules(self.policy, agent)
        if not rules:
            return
        now = time.monotonic()
        last, unsaid = self._unconfirmed_said.get(agent, (None, 0))
        if last is not None and now - last < UNCONFIRMED_LOG_SECONDS:
            self._unconfirmed_said[agent] = (last, unsaid + 1)
            return
        self._unconfirmed_said[agent] = (now, 0)
        self.log("command line judged on the probes' cut copy", level="warning", agent=agent,
                 session=ev.h.session, pid=ev.h.pid, exe=ev.filename, reason=reason,
                 judged_bytes=len(cmdline.block(ev.argv)), rules=rules, unsaid=unsaid)

    def _observe(self, ev: Event, agent: str, proc: Process | None,
                 acted: list[Verdict]) -> None:
        m = self.metrics
        m.observe_event(ev.kind, agent)
        if isinstance(ev, ExecEvent):
            m.observe_exec(agent, ev.filename)
        elif isinstance(ev, ConnectEvent):
            enforce = self.policy.mode == Mode.ENFORCE
            done = [rule_verdict(v.action.value, enforce and v.action != Action.DENY)
                    for v in acted]
            kernel = self._connect_verdicts.pop(ev.h.tid, None)
            if kernel:
                done.append(kernel)
            m.observe_connect(agent, ev.address, connect_verdict(*done))
        elif isinstance(ev, VerdictEvent) and ev.verdict == VerdictKind.CONNECT:
            if len(self._connect_verdicts) > 4096:  # their connect events were lost
                self._connect_verdicts.clear()
            self._connect_verdicts[ev.h.tid] = kernel_connect_verdict(ev)
        elif isinstance(ev, ExitEvent) and proc is not None:
            m.observe_exit(agent, proc.cpu_ns)

    # --- metrics source (monitor/observe/metrics.py MetricsSource) ------------------------------

    def agent_usage(self) -> Mapping[str, AgentUsage]:
        with self.lock:
            return usage_of(self.tracker.sessions())

    def verdict_counts(self) -> Mapping[tuple[str, str, str, str], int]:
        with self.lock:
            return dict(self.judge.counts)

    def kill_counts(self) -> Mapping[tuple[str, str], int]:
        with self.lock:
            return dict(self.judge.kills)

    def bpf_counters(self) -> Mapping[events.Counter, int]:
        try:
            return self.probes.counters()
        except RuntimeError:  # not loaded yet, or closed
            return {}

    def agent_losses(self) -> Mapping[str, tuple[int, int]]:
        try:
            by_index = self.probes.agent_losses()
        except RuntimeError:  # not loaded yet, or closed
            return {}
        return {("pending" if i >= events.MAX_AGENTS else self.agents.name(i)): v
                for i, v in by_index.items()}

    def probes_attached(self) -> int:
        return int(self.probes.attached)

    def probes_expected(self) -> int:
        return int(getattr(self.probes, "expected", self.probes.attached))

    def policy_info(self) -> PolicyInfo:
        return PolicyInfo(self.policy.sha256, self.policy.mode.value)

    def alerts_spooled(self) -> int:
        return self.notifier.spooled()

    def alert_deliveries(self) -> Mapping[tuple[str, str], int]:
        return dict(self.notifier.deliveries)

    def sink_stats(self) -> Mapping[str, SinkStats]:
        audit = getattr(self.log, "audit", None)
        return {"alert_spool": self.notifier.sink_stats(),
                "audit_log": audit.stats() if isinstance(audit, AuditLog) else SinkStats()}

    def _settle_pending(self, ev: Event) -> Event:
        """Events of a candidate's pending session: decide it on its first exec (which the
        ring buffer delivers before anything its process does), then name every process of
        an accepted session, or untrack every process of a rejected one. A rejected event
        comes back untracked (session 0): only `trace --all` shows it."""
        sid = ev.h.session
        if isinstance(ev, ExecEvent) and ev.flags & events.FLAG_CANDIDATE:
            agent = self._recognise_exec(ev)
            if agent is not None:
                self.tracker.start_session(sid, agent, ev.h.pid, ev.h.ts_ns)
                self.log("agent session started", agent=agent, session=sid,
                         root_pid=ev.h.pid, exe=ev.filename, via="userspace match")
                if self.latched(agent):
                    self.enforcer.kill_session(sid, [ev.h.pid], manual=True)
        session = self.tracker.session(sid)
        pids = [ev.h.pid, ev.child_pid] if isinstance(ev, ForkEvent) else [ev.h.pid]
        if session is None:  # rejected, or its deciding exec was lost
            if not isinstance(ev, ExitEvent):
                for pid in pids:
                    if self.tracker.process(pid) is None:  # not registered/adopted since
                        # only while still pending: the kernel may have made it an agent
                        # root since (a privilege-dropping exec matched a uid matcher)
                        self.probes.untrack_if(pid, sid)
            return replace(ev, h=replace(ev.h, session=0, agent=0))
        idx = self.agents.index(session.agent)
        if not isinstance(ev, ExitEvent):
            for pid in pids:
                self.probes.retag(pid, idx)
        return replace(ev, h=replace(ev.h, agent=idx))

    def _recognise_exec(self, ev: ExecEvent) -> str | None:
        if ev.h.pid in self._excluded():
            return None
        info = self.procfs.read(ev.h.pid)
        facts = ProcessFacts(ev.h.pid, ev.h.comm, info.exe if info else ev.filename,
                             ev.argv or (info.argv if info else ()), ev.h.uid,
                             info.cgroup if info else "", line=ev.line)
        return self._recognise_facts(facts)

    # --- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self.lock:
            sessions = [
                {"session": s.id, "agent": s.agent, "root_pid": s.root_pid,
                 "processes": len(s.processes), "cpu_seconds": round(s.cpu_ns / 1e9, 3),
                 "execs": s.execs, "connects": s.connects}
                for s in self.tracker.sessions()
            ]
        counters = {c.name.lower(): v for c, v in self.probes.counters().items()}
        policy = {"source": self.policy.source, "sha256": self.policy.sha256,
                  "mode": self.policy.mode.value, "rules": len(self.policy.rules),
                  "kernel_rules": [r.name for r in self.tables.rules]}
        verdicts = [{"agent": a, "rule": r, "action": act, "mode": m, "count": n}
                    for (a, r, act, m), n in sorted(self.judge.counts.items())]
        return {"probes": self.probes.attached, "probes_expected": self.probes.expected,
                "events": self.events, "policy": policy, "verdicts": verdicts,
                "decode_errors": self.decode_errors, "sessions": sessions,
                "processes_evicted": self.tracker.evicted,
                "counters": counters, "agents": self.agents.names()}
