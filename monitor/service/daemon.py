"""The daemon: one event loop from the ring buffers through the sessions and the judge to
the sinks, and the single writer of session and judge state.

Order at start: attach the probes (from then on the kernel tracks every child of a
tracked process), install the in-kernel matchers, recover what pinned probes kept, then
adopt the agent trees already running. The loop reads the rings, ticks, and runs the
control socket's operations that change state (register, reload, the kill switch's latch):
they reach it through a queue that wakes it (service/inbox.py) and run on the loop, under
the lock the collector's readers take, never on the control socket's threads; `status`
only reads, under that lock, like a scrape. Wiring only: each job is in its own module
(sessions/intake, adoption, registry, recovery; enforce/killswitch; service/reload,
status). It never signals a process itself.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from monitor.config.types import Config
from monitor.enforce.enforcer import Enforcer
from monitor.enforce.judge import Judge
from monitor.enforce.killswitch import KillSwitch
from monitor.kernel.abi import DecodeError, decode
from monitor.kernel.loader import Probes
from monitor.kernel.maps import KernelMaps
from monitor.model import events
from monitor.model.agents import merged_agents
from monitor.model.events import Event, ExecEvent, ExitEvent
from monitor.observe.jsonlog import JsonLog
from monitor.observe.metrics import MetricsState
from monitor.observe.notifier import Notifier
from monitor.policy.engine import argv_rules
from monitor.policy.kernel_tables import compile_kernel
from monitor.policy.load import check_capacity, load_policy_text
from monitor.policy.types import Policy
from monitor.service.control import ControlServer, Handler, Subscribers
from monitor.service.inbox import Inbox
from monitor.service.reload import Reload
from monitor.service.sdnotify import SystemdNotifier
from monitor.service.status import Feed, InForce, Report
from monitor.sessions import completion
from monitor.sessions.adoption import Adopter
from monitor.sessions.clock import Clock, SystemClock
from monitor.sessions.identity import Identity
from monitor.sessions.intake import Intake
from monitor.sessions.loader import Loaders
from monitor.sessions.procfs import ProcFS
from monitor.sessions.recovery import Recovery, agents_file
from monitor.sessions.registry import AgentTable, Recognizer, Registry, SessionIds
from monitor.sessions.sshconfig import SshConfigStep
from monitor.sessions.tracker import Process, Tracker

Sink = Callable[[Event, str], None]

BURST_GAP_SECONDS = 0.002
BATCH_SECONDS = 0.001


class Monitor:
    def __init__(self, config: Config, policy: Policy | None = None, *,
                 probes: KernelMaps | None = None, procfs: ProcFS | None = None,
                 sink: Sink | None = None, log: Callable[..., None] | None = None,
                 control_path: str | None = None, clock: Clock | None = None) -> None:
        policy = policy or load_policy_text("mode: monitor\n", "<no policy>")
        specs = merged_agents(config, policy)
        check_capacity(config, policy)
        self.now = InForce(config, policy, specs, compile_kernel(policy))
        self.probes: KernelMaps = probes or Probes()
        self.procfs = procfs or ProcFS()
        self.sink = sink
        self.log = log or JsonLog(audit_path=config.monitor.audit_log)
        clock = clock or SystemClock()
        self.sd = SystemdNotifier()
        self.reload_requested = threading.Event()
        self.control_path = control_path
        self.lock = threading.RLock()  # held by the loop's writes and other threads' reads
        self.agents = AgentTable([a.name for a in specs])
        self.agents.on_new = self._save_agents
        self.tracker = Tracker(self.agents.name, history=config.monitor.history,
                               max_processes=config.monitor.max_processes)
        self.metrics = MetricsState(self.agents.names())  # configured agents label first
        self.recognizer = Recognizer(specs, self.procfs)
        self.enforcer = Enforcer(self.probes, self.procfs, self.recognizer.excluded)
        self.notifier = Notifier(config.alerts, log=self.log)
        self.subscribers = Subscribers()
        self.feed = Feed(self.subscribers, self.log)
        self.judge = Judge(policy, self.now.tables, self.enforcer, self.tracker,
                           self.feed.verdict_log, metrics=self.metrics,
                           alerts=self.notifier)
        self.kill_switch = KillSwitch(self.agents, self.probes, self.tracker, self.enforcer,
                                      self.log, self.metrics, self.notifier)
        self.report = Report(self.now, self.lock, self.tracker, self.judge, self.probes,
                             self.agents, self.metrics, self.notifier, self.log)
        self.reloads = Reload(self.now, self.probes, self.agents, self.recognizer, self.judge,
                              self.metrics, self.sd, self.report.status_line, self.log)
        self.identity = self.reloads.identity = Identity(str(self.procfs.root), log=self.log)
        ids = SessionIds()
        self.loaders = Loaders(self.procfs.root)  # ld.so PROGRAM: judged as PROGRAM
        self.adopter = Adopter(self.tracker, self.probes, self.procfs, self.agents,
                               self.recognizer, ids, self._judge_running, self.log, clock)
        self.recovery = Recovery(self.tracker, self.probes, self.procfs, self.agents, ids,
                                 self.adopter, self._judge_running, self.log)
        self.registry = Registry(self.tracker, self.probes, self.procfs, self.recognizer, ids,
                                 self.adopter.adopt, self.kill_switch.latched, self.log)
        self.intake = Intake(self.tracker, self.probes, self.procfs, self.agents,
                             self.recognizer, latched=self.kill_switch.latched,
                             kill_latched=self.kill_switch.kill_latched,
                             argv_rules=lambda agent: argv_rules(self.now.policy, agent),
                             count_unconfirmed=self.metrics.observe_argv_unconfirmed,
                             log=self.log, clock=clock)
        self.ssh_config = SshConfigStep(self.procfs.root)
        self.events = 0
        self.decode_errors = 0
        self.cgroup: str | None = None
        self._control: ControlServer | None = None
        self.inbox = Inbox(self.lock, self.probes.wake)  # control operations, run by the loop
        self.on_loop = self.inbox.call

    @property
    def policy(self) -> Policy:
        return self.now.policy

    @property
    def config(self) -> Config:
        return self.now.config

    def _judge_running(self, proc: Process, agent: str) -> object:
        """A process found running (adopted, recovered, reconciled): judged like an exec, on
        the program it runs through a loader and on what its file is."""
        run = self.loaders.running(proc)
        if run is not None and run.loader:
            return self.judge.on_running(proc, agent, self.identity.identify(run))
        return self.judge.on_running(proc, agent, sha256=self.identity.running(proc.pid))

    def _save_agents(self) -> None:
        if self.now.config.monitor.pin_dir:
            self.agents.save(agents_file(self.now.config.monitor.control_socket))

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        now = self.now
        self.notifier.start()
        self.probes.open()
        self.probes.install_rules(now.tables, self.agents.names(), now.gen)
        self.reloads.policy_settings(now.policy, now.tables)
        # connect events and connect rules both come from these hooks: no hooks, no monitor
        self.cgroup = self.probes.attach_cgroup()
        self.probes.release_compiler()  # every program is loaded: LLVM is done
        if now.tables.userspace_only:
            self.log("more kernel-enforceable rules than the kernel holds; these are "
                     "evaluated in userspace", level="warning",
                     rules=[r.name for r in now.tables.userspace_only])
        self.reloads.install_matchers()
        self.probes.on_record(self._on_record)
        # what the host's named programs are, before anything is judged (adoption too)
        self.judge.host = self.reloads.fingerprint(now.policy, quiet=True)
        with self.lock:
            if now.config.monitor.pin_dir:
                self.recovery.recover(agents_file(now.config.monitor.control_socket))
            self.adopter.adopt_running()
        if self.control_path:
            self._control = ControlServer(self.control_path, self._handlers(),
                                          self.subscribers, log=self.log)
            self._control.start()
        self.log("monitor started", probes=self.probes.attached,
                 probes_expected=self.probes.expected,
                 agents=self.agents.names(), sessions=len(self.tracker.sessions()),
                 control_socket=self.control_path, policy=now.policy.source,
                 policy_sha256=now.policy.sha256, mode=now.policy.mode.value,
                 rules=len(now.policy.rules), kernel_rules=len(now.tables.rules),
                 cgroup=self.cgroup)
        self.reloads.say_host(now.policy)  # after the start line, which comes first

    def _handlers(self) -> dict[str, Handler]:
        def queued(op: Handler) -> Handler:
            return lambda req, peer: self.on_loop(lambda: op(req, peer))

        return {
            "ping": lambda req, peer: {"ok": True, "pid": os.getpid()},
            "register": queued(self.registry.op_register),
            # a read (under the lock, like a scrape): answered at once, not on the loop
            "status": lambda req, peer: {"ok": True, **self.status()},
            "killswitch": lambda req, peer: self.kill_switch.op(req, peer, self.on_loop),
            "reload": queued(self.reloads.op),
        }

    def stop(self) -> None:
        self.sd.stopping()
        if self._control is not None:
            self._control.stop()
            self._control = None
        self.probes.close()
        self.ssh_config.close()
        self.notifier.close()
        self.log("monitor stopped", events=self.events)
        if isinstance(self.log, JsonLog):
            self.log.close()  # the audit log's last try at what the disk refused

    def run(self, stop: threading.Event) -> None:
        tick = self.now.config.monitor.tick_seconds
        next_tick = time.monotonic() + tick
        self.sd.ready(self.report.status_line())
        last = 0.0
        self.inbox.open()
        try:
            while not stop.is_set():
                # Records that may need a userspace kill wake this at once; the others at
                # most every 50 ms (probes: wake_flags, Setting.WAKE), else the timeout.
                self.probes.poll(100)
                now = time.monotonic()
                if now - last < BURST_GAP_SECONDS:
                    # Woken again right away: a burst (a tracked fork+exec loop wakes this
                    # at every exec). Let records gather for a moment instead of taking one
                    # wakeup each: the wakeups, not the work, slowed such a loop 1.1-1.3x on
                    # these 2-vCPU VMs (docs/benchmarks.md). Costs an event BATCH_SECONDS.
                    time.sleep(BATCH_SECONDS)
                last = now
                self.sd.watchdog(now)  # from the loop itself: a stuck loop stops pinging
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload_from_files()
                self.inbox.drain()
                if now >= next_tick:
                    self.tick()
                    self.sd.status(self.report.status_line())
                    next_tick = now + tick
        finally:
            self.inbox.close()  # runs what came in as the loop ended

    # --- control operations: writes run on the loop, `status` only reads ----------------

    def reload_from_files(self) -> bool:
        """SIGHUP or `reload`: load config and policy again; a bad one is refused."""
        with self.lock:
            return self.reloads.from_files()

    def status(self) -> dict[str, Any]:
        return self.report.status(self.events, self.decode_errors)

    # --- events --------------------------------------------------------------------------

    def _on_record(self, raw: bytes) -> None:
        if self.inbox.waiting:  # a control operation: run it now, not after the flood
            self.inbox.drain()
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
            if isinstance(ev, ExecEvent):
                ev, unconfirmed = self.intake.complete(ev)
            if ev.h.agent == events.AGENT_PENDING:
                ev = self.intake.settle_pending(ev)
            if isinstance(ev, ExecEvent) and ev.h.session:
                ev = self.loaders.unwrap(ev)  # ld.so PROGRAM: judged as PROGRAM
                ev = self.identity.identify(ev)  # what the file is (an agent's exec only)
                ev = self.ssh_config.resolve(ev, needed=self.judge.wants_ssh_config(
                    ev, self.agents.name(ev.h.agent)))
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
                self.report.observe(ev, agent, proc, acted)
                if unconfirmed is not None and isinstance(ev, ExecEvent):
                    self.intake.argv_unconfirmed(ev, agent, unconfirmed)
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
            self.feed.event(ev, agent)

    def tick(self) -> None:
        """Read what the kernel sums (CPU time per process) into the tracker, and make the
        tracker agree with the kernel's process map where records were lost."""
        self.probes.beat(self.now.config.monitor.fail_closed_seconds)
        readings = self.probes.cpu_readings()
        lost = self.probes.counters().get(events.Counter.LOST, 0)
        with self.lock:
            self.tracker.set_cpu(readings)
            self.adopter.reconcile({pid for pid, _ in readings}, lost)
            self.judge.on_tick()
            self.reloads.recheck_host(time.monotonic())
