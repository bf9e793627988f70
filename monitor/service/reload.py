"""Putting a config and policy in force: at start, and on a reload (SIGHUP or the control
socket's `reload`), which the daemon runs on its loop.

A reload loads both files again and swaps them in at once: the kernel rule and matcher
maps are written into the idle generation and flipped in one word write, so every probe
sees the old policy or the new one, never a mix. A bad file, or a bug in loading one, is
refused and logged, and the old policy stays in force: a reload never takes the monitor
down. Nothing here judges an event or signals a process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from traceback import format_exception
from typing import Any

from monitor.config.types import Config
from monitor.enforce.judge import Judge
from monitor.kernel.maps import KernelMaps
from monitor.model.agents import merged_agents
from monitor.model.errors import ConfigError, EnvironmentProblem
from monitor.model.events import Setting
from monitor.observe.metrics import MetricsState
from monitor.policy.identity import NO_HOST_BINARIES, HostBinaries, named_programs
from monitor.policy.kernel_tables import (
    KernelTables,
    compile_kernel,
    connects_need_decisions,
    kernel_matchers,
    wake_mask,
)
from monitor.policy.load import check_capacity
from monitor.policy.types import FailClosed, Policy
from monitor.service.sdnotify import SystemdNotifier
from monitor.service.status import InForce
from monitor.sessions.hostbins import changed, fingerprint_host, summary
from monitor.sessions.identity import Identity
from monitor.sessions.registry import AgentTable, Recognizer

Loader = Callable[[], tuple[Config, Policy]]

HOST_RECHECK_SECONDS = 10.0  # how often the host binaries a policy names are stat'ed


class Reload:
    def __init__(self, now: InForce, probes: KernelMaps, agents: AgentTable,
                 recognizer: Recognizer, judge: Judge, metrics: MetricsState,
                 sd: SystemdNotifier, status_line: Callable[[], str],
                 log: Callable[..., None]) -> None:
        self.now = now
        self.probes = probes
        self.agents = agents
        self.recognizer = recognizer
        self.judge = judge
        self.metrics = metrics
        self.sd = sd
        self.status_line = status_line
        self.log = log
        self.loader: Loader | None = None
        self.identity: Identity | None = None  # set by the daemon: fingerprints execs
        self._host_checked = 0.0

    def fingerprint(self, policy: Policy, *, quiet: bool = False) -> HostBinaries:
        """Fingerprint the host binaries the policy names (a copy of one is that program),
        for the judge and for the exec fingerprinting's budget; logged unless quiet."""
        if self.identity is None:
            return NO_HOST_BINARIES
        host = fingerprint_host(named_programs(policy), self.identity,
                                log=None if quiet else self.log)
        self.identity.host = host
        return host

    def say_host(self, policy: Policy) -> None:
        """Log what fingerprint(policy, quiet=True) found."""
        if self.identity is not None:
            self.log("host binaries fingerprinted",
                     **summary(self.identity.host, named_programs(policy)))

    def recheck_host(self, now: float) -> None:
        """Every HOST_RECHECK_SECONDS: fingerprint the host binaries again if a package
        changed them (a copy of the new ssh is ssh too)."""
        if self.identity is None or now < self._host_checked + HOST_RECHECK_SECONDS:
            return
        self._host_checked = now
        if changed(self.identity.host, named_programs(self.now.policy)):
            self.judge.host = self.fingerprint(self.now.policy)

    def install_matchers(self) -> None:
        """The in-kernel agent matchers of the specs in force, in the generation in force."""
        comms, uids = kernel_matchers(self.now.specs, self.agents.index)
        self.probes.set_matchers(comms, uids, self.now.gen)
        self.probes.flip(self.now.gen)
        self.probes.set_setting(Setting.EXEC_CANDIDATES,
                                1 if self.recognizer.userspace_matchers else 0)

    def policy_settings(self, policy: Policy, tables: KernelTables) -> None:
        """The probes' policy-wide switches: which records wake the monitor, whether
        connect records may carry a verdict, and fail-closed."""
        self.probes.set_setting(Setting.WAKE, wake_mask(policy, tables))
        self.probes.set_setting(Setting.CONNECT_DECIDE,
                                1 if connects_need_decisions(policy, tables) else 0)
        self.probes.set_setting(Setting.FAIL_CLOSED,
                                1 if policy.fail_closed == FailClosed.KILL else 0)

    def from_files(self) -> bool:
        """Load config and policy again; a bad one is refused and the old stays."""
        if self.loader is None:
            return False
        self.sd.reloading()
        start = time.monotonic()
        try:
            config, policy = self.loader()
        except (ConfigError, EnvironmentProblem) as e:
            return self._refused(str(e), start)
        except Exception as e:  # a bug, not bad input: see below
            # Not bad input (the loaders raise ConfigError for any file): a bug in loading,
            # which changes nothing. Logged with its traceback and counted as refused; the
            # running policy stays in force: a reload must never take the monitor (and
            # every probe with it) down.
            return self._refused(f"internal error {type(e).__name__}: {e!s:.200}",
                                 start, traceback="".join(format_exception(e)[-8:]))
        try:
            self.swap(config, policy)
        except (ConfigError, EnvironmentProblem) as e:
            return self._refused(str(e), start)
        self.metrics.observe_reload(True, time.monotonic() - start)
        self.sd.ready(self.status_line())
        return True

    def op(self, req: dict[str, Any], peer: object) -> dict[str, Any]:
        """The control socket's `reload` (run on the loop)."""
        ok = self.from_files()
        return {"ok": ok, "policy_sha256": self.now.policy.sha256} if ok else {
            "ok": False, "error": "reload refused: see the monitor's log (the old policy stays)"}

    def _refused(self, reason: str, start: float, **fields: object) -> bool:
        self.metrics.observe_reload(False, time.monotonic() - start)
        self.log("policy reload refused", level="error", reason=reason,
                 kept=self.now.policy.sha256, **fields)
        self.sd.ready(self.status_line())
        return False

    def swap(self, config: Config, policy: Policy) -> None:
        """Put a new config and policy in force at once."""
        specs = merged_agents(config, policy)
        check_capacity(config, policy)
        tables = compile_kernel(policy)
        now = self.now
        for spec in specs:
            self.agents.index(spec.name)
        gen = 1 - now.gen
        self.probes.install_rules(tables, self.agents.names(), gen)
        comms, uids = kernel_matchers(specs, self.agents.index)
        self.probes.set_matchers(comms, uids, gen)
        self.probes.flip(gen)
        self.policy_settings(policy, tables)
        old = now.policy.sha256
        now.gen, now.config, now.policy, now.specs, now.tables = \
            gen, config, policy, specs, tables
        self.recognizer.use(specs)
        self.probes.set_setting(Setting.EXEC_CANDIDATES,
                                1 if self.recognizer.userspace_matchers else 0)
        self.judge.use(policy, tables, self.fingerprint(policy))
        self.log("policy reloaded", previous=old, policy=policy.source,
                 policy_sha256=policy.sha256, mode=policy.mode.value,
                 rules=len(policy.rules), kernel_rules=len(tables.rules))
