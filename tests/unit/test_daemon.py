"""Unit tests for monitor.service.daemon.Monitor: what reaches the sink, decoding, ticks,
the policy-wide kernel switches, reloads, metrics of what the disk refused, and control
operations run on the loop. FakeProbes and a fixture /proc tree (tests/support/monitor.py).
"""

from __future__ import annotations

import ctypes as ct
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from timebox import within

from monitor.config.types import Config
from monitor.kernel.abi import CForkEvent, CHeader
from monitor.kernel.mapio import TrackedProc
from monitor.model import events
from monitor.model.errors import ControlError
from monitor.model.events import (
    SESSION_KERNEL_BIT,
    ConnectEvent,
    EventType,
    ExecEvent,
    ExecFlag,
    ForkEvent,
    KAction,
    Setting,
    VerdictEvent,
    VerdictKind,
)
from monitor.observe.jsonlog import JsonLog
from monitor.observe.metrics import CONNECT_KINDS, CONNECT_VERDICTS, DESTINATIONS
from monitor.policy.load import load_policy_text
from monitor.service.daemon import Monitor
from monitor.sessions.procfs import ProcFS
from tests.support.hostile import HOSTILE_POLICIES
from tests.support.kernel import FakeProbes
from tests.support.monitor import (
    CLAUDE,
    CONFIG,
    B,
    FakePeer,
    agent_tree,
    config,
    header,
    kernel_candidate,
    make_proc,
    rig,
    wait_until,
)


def test_trace_all_reports_untracked_events(tmp_path: Path) -> None:
    r = rig(tmp_path, trace_all=True)
    agent_tree(r.proc)
    ev = ExecEvent(header(B + 10, comm="bash"), old_tid=B + 10, ppid=0, cgroup_id=1,
                   flags=ExecFlag.UNTRACKED, filename="/usr/bin/bash", argv=("bash",))
    r.mon.handle(ev)
    assert r.sink == [(ev, "")]
    assert r.probes.track_calls == []


def test_trace_all_reports_rejected_candidates(tmp_path: Path) -> None:
    r = rig(tmp_path, trace_all=True)
    agent_tree(r.proc)
    r.mon.handle(kernel_candidate(r, B + 10, ("bash", "-c", "ls"), comm="bash",
                                  filename="/usr/bin/bash"))
    assert [(type(ev).__name__, ev.h.pid, agent) for ev, agent in r.sink] == [
        ("ExecEvent", B + 10, "")]


def test_kernel_new_root_and_tracked_events_reach_sink(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    sid = SESSION_KERNEL_BIT | 7
    root = ExecEvent(header(B, session=sid, agent=CLAUDE, comm="claude"), old_tid=B, ppid=0,
                     cgroup_id=1, flags=ExecFlag.NEW_ROOT | ExecFlag.ARGV_MISSING,
                     filename="/opt/claude/bin/claude", argv=())
    r.mon.handle(root)
    r.mon.handle(ForkEvent(header(B, session=sid, agent=CLAUDE, comm="claude", ts=2_000),
                           child_pid=B + 1))
    assert [(type(ev).__name__, agent) for ev, agent in r.sink] == [
        ("ExecEvent", "claude-code"), ("ForkEvent", "claude-code")]
    first = r.sink[0][0]
    assert isinstance(first, ExecEvent)
    assert first.argv == ("claude", "--resume")  # argv not captured: read from /proc
    s = r.mon.tracker.session(sid)
    assert s is not None and s.agent == "claude-code" and set(s.processes) == {B, B + 1}
    (log,) = r.log.find("agent session started")
    assert log["via"] == "kernel match" and log["session"] == sid
    assert r.probes.track_calls == []  # the kernel tracks it already


def test_raw_records_are_decoded_and_bad_ones_counted(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.start()
    try:
        assert r.probes.callback is not None
        f = CForkEvent()
        f.h = CHeader(9, EventType.FORK, B, B, SESSION_KERNEL_BIT | 3, CLAUDE, 1000, b"claude")
        f.child_pid = B + 5
        r.probes.callback(bytes(f))
        r.probes.callback(bytes(f)[:10])
        r.probes.callback(bytes(f)[: ct.sizeof(CHeader)])
    finally:
        r.mon.stop()
    assert [(type(ev).__name__, agent) for ev, agent in r.sink] == [("ForkEvent", "claude-code")]
    assert r.mon.decode_errors == 2
    errors = [f for m, level, f in r.log.lines if m == "undecodable event" and level == "error"]
    assert len(errors) == 2
    assert r.mon.status()["decode_errors"] == 2


def test_tick_reads_cpu_from_kernel_map(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.adopter.adopt_running()
    r.probes.procs[B + 2] = replace(r.probes.procs[B + 2], cpu_ns=2_500_000_000)
    r.probes.procs[B] = replace(r.probes.procs[B], cpu_ns=500_000_000)
    r.mon.tick()
    st = r.mon.status()
    by_agent = {s["agent"]: s for s in st["sessions"]}
    assert by_agent["claude-code"]["cpu_seconds"] == 3.0
    assert by_agent["claude-code"]["processes"] == 4
    assert by_agent["aider"]["cpu_seconds"] == 0
    assert st["counters"]["lost"] == 0
    assert st["agents"][:5] == ["claude-code", "ci-bot", "scoped-node", "aider", "goose"]



# --- fail-closed and connect decisions (policy-wide kernel switches) -----------------------


@pytest.mark.parametrize("text,fail_closed,decide", [
    ("mode: enforce\n", 1, 0),
    ("mode: enforce\nfail_closed: alert\n", 0, 0),
    ("mode: enforce\nrules:\n  - name: meta\n    event: connect\n    action: alert\n"
     "    match: {address: [169.254.169.254]}\n", 1, 1),
])
def test_policy_switches_reach_the_kernel_at_start_and_reload(
        tmp_path: Path, text: str, fail_closed: int, decide: int) -> None:

    r = rig(tmp_path)
    r.mon.start()
    try:
        assert r.probes.settings[Setting.FAIL_CLOSED] == 1  # the default: kill
        r.mon.reloads.swap(r.mon.config, load_policy_text(text, "p.yaml"))
        assert r.probes.settings[Setting.FAIL_CLOSED] == fail_closed
        assert r.probes.settings[Setting.CONNECT_DECIDE] == decide
    finally:
        r.mon.stop()


def test_reconcile_forgets_what_the_kernel_stopped_tracking_and_judges_what_it_missed(
        tmp_path: Path) -> None:
    """Records lost: a process the map dropped (its exit record lost) leaves the tracker
    after two ticks; one the map holds but no record announced is read from /proc and
    judged."""

    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.start()
    try:
        r.mon.reloads.swap(r.mon.config, load_policy_text(
            "mode: monitor\nrules:\n  - name: no-reverse\n    event: exec\n"
            "    action: kill\n    match: {ssh: [remote_forward]}\n", "p.yaml"))
        (session,) = [s for s in r.mon.tracker.sessions() if s.agent == "claude-code"]
        gone = next(iter(session.processes))
        r.probes.procs.pop(gone)  # exited; its exit record never came
        make_proc(r.proc, 4242, session.root_pid, "ssh",
                  argv=("ssh", "-R", "9000:localhost:22", "x.example"))
        r.probes.procs[4242] = TrackedProc(4242, session.id,
                                           r.mon.agents.index("claude-code"),
                                           session.root_pid, events.STATUS_UNSET, 0, 0)
        r.probes.lost = 1  # the kernel counted a loss
        r.mon.tick()
        assert r.mon.tracker.process(gone) is not None  # one tick absent: maybe in flight
        assert r.mon.tracker.process(4242) is not None
        (v,) = r.log.find("verdict")
        assert v["pid"] == 4242 and v["rule"] == "no-reverse" and v["outcome"] == "would kill"
        r.mon.tick()
        assert r.mon.tracker.process(gone) is None
    finally:
        r.mon.stop()

# --- what the disk refuses: metrics -----------------------------------------------------------


def test_audit_lines_and_alerts_a_full_disk_refuses_are_exported_and_overflow_counted(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The monitor's audit log and alert spool on a full disk (/dev/full; the spool's queue
    made unusable): what waits in memory and what is dropped beyond the bounds (8 MiB of
    audit lines, 16 MiB of alerts) is on /metrics, and no traceback is printed."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from monitor.observe.alerts import kill_alert
    from monitor.observe.collector import AgentwatchCollector

    audit = tmp_path / "audit.jsonl"
    audit.symlink_to("/dev/full")
    spool = tmp_path / "spool"
    cfg = config(CONFIG + f"  audit_log: {audit}\nalerts:\n  webhook_url: http://127.0.0.1:9/x\n"
                 f"  spool_dir: {spool}\n")
    mon = Monitor(cfg, probes=FakeProbes(False),
                  procfs=ProcFS(tmp_path / "proc"))
    mon.notifier.start()
    try:
        (spool / "queue").rmdir()
        (spool / "queue").write_text("")  # the spool's disk refuses every write
        for i in range(9000):  # ~9.4 MiB of verdict lines
            mon.log("verdict", rule="no-reverse-ssh", pid=i, argv=["x" * 1000])
        for i in range(170):  # ~17 MiB of alerts
            mon.notifier.notify(kill_alert(agent="claude-code", rule="r", action="kill",
                                           outcome="killed", reason="r", at=1e9 + i,
                                           argv=("x" * 100_000,)))
        mon.notifier.flush(5)  # each tried on disk by the spool writer's thread
        registry = CollectorRegistry()
        registry.register(AgentwatchCollector(mon.report))
        text = generate_latest(registry).decode()
        got = {(s.name, s.labels["sink"]): s.value
               for f in text_string_to_metric_families(text) for s in f.samples
               if s.name.startswith("agentwatch_sink_")}
        assert got[("agentwatch_sink_dropped_total", "audit_log")] > 0
        assert got[("agentwatch_sink_buffered", "audit_log")] + \
            got[("agentwatch_sink_dropped_total", "audit_log")] == 9000
        assert got[("agentwatch_sink_buffered", "alert_spool")] + \
            got[("agentwatch_sink_dropped_total", "alert_spool")] == 170
        assert got[("agentwatch_sink_dropped_total", "alert_spool")] > 0
        assert got[("agentwatch_sink_write_errors_total", "audit_log")] >= 1
        assert got[("agentwatch_sink_write_errors_total", "alert_spool")] >= 1
    finally:
        mon.notifier.close()
        assert isinstance(mon.log, JsonLog)
        mon.log.close()  # its retry thread stops
    assert "Traceback" not in capfd.readouterr().err


# --- reload: a hostile or broken file never takes the monitor down (issue 10, item 8) -----


def _reload(tmp_path: Path, text: str) -> tuple[bool, bool, dict[str, int], list[str]]:
    """(reload ok, policy unchanged, reload counts, reasons logged) after a reload of text."""
    from monitor.policy.load import load_policy

    r = rig(tmp_path)
    before = r.mon.policy.sha256
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    r.mon.reloads.loader = lambda: (r.mon.config, load_policy(path))
    ok = r.mon.reload_from_files()
    return (ok, r.mon.policy.sha256 == before, r.mon.metrics.snapshot().reloads,
            [f["reason"] for f in r.log.find("policy reload refused")])


@pytest.mark.parametrize("name", sorted(HOSTILE_POLICIES))
def test_a_reload_of_a_hostile_policy_is_refused_and_the_old_one_stays(
        tmp_path: Path, name: str) -> None:
    # in a child with a time limit: on a YAML bomb the old loader ran for minutes
    ok, unchanged, reloads, [reason] = within(
        20, lambda: _reload(tmp_path, HOSTILE_POLICIES[name]))
    assert (ok, unchanged, reloads) == (False, True, {"ok": 0, "refused": 1})
    assert reason.startswith(f"{tmp_path}/policy.yaml:") and len(reason) < 2000


def test_a_loader_bug_during_a_reload_is_logged_and_the_monitor_keeps_running(
        tmp_path: Path) -> None:
    r = rig(tmp_path)
    before = r.mon.policy.sha256

    def broken() -> tuple[Config, Any]:
        raise RecursionError("maximum recursion depth exceeded")

    r.mon.reloads.loader = broken
    assert r.mon.reload_from_files() is False
    assert r.mon.policy.sha256 == before
    [refused] = r.log.find("policy reload refused")
    assert refused["reason"].startswith("internal error RecursionError")
    assert "broken" in refused["traceback"]
    assert r.mon.metrics.snapshot().reloads["refused"] == 1



# --- control operations run on the loop ------------------------------------------------------


def test_control_operations_run_on_the_loop(tmp_path: Path) -> None:
    """register, reload and the kill switch's latch reach the loop through its queue, and
    wake it (it may be waiting for records): the loop is the one writer of session state.
    `status` only reads, on the caller's thread."""
    r = rig(tmp_path)
    agent_tree(r.proc)
    stop = threading.Event()
    loop = threading.Thread(target=r.mon.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_until(lambda: r.probes.polls > 0)
        assert r.mon.on_loop(threading.current_thread) is loop
        reply = r.mon._handlers()["register"]({"op": "register", "agent": "tool"},
                                              FakePeer(B + 10))
        assert reply == {"ok": True, "session": 1, "pid": B + 10}
        assert r.probes.wakes >= 2  # on_loop above and register each woke the loop
        status = r.mon._handlers()["status"]({"op": "status"}, FakePeer(B + 10))
        assert [s["agent"] for s in status["sessions"]] == ["tool"]
        with pytest.raises(ControlError, match="unknown agent"):
            r.mon.on_loop(lambda: r.mon.kill_switch.plan("nobody", False, False, ""))
    finally:
        stop.set()
        loop.join(5)
    assert not loop.is_alive()
    assert r.mon.on_loop(threading.current_thread) is threading.current_thread()


def test_a_raw_socket_verdict_waits_for_no_connect_record(tmp_path: Path) -> None:
    """A kernel verdict on opening a raw or ICMP socket has no connect record after it: the
    next connect of that thread is counted by its own verdict (allowed), not this one."""
    r = rig(tmp_path)
    agent_tree(r.proc)
    sid = SESSION_KERNEL_BIT | 7
    h = header(B, session=sid, agent=CLAUDE, comm="claude")
    r.mon.handle(ExecEvent(h, old_tid=B, ppid=0, cgroup_id=1, flags=ExecFlag.NEW_ROOT,
                           filename="/opt/claude/bin/claude", argv=("claude",)))
    r.mon.handle(VerdictEvent(h, VerdictKind.CONNECT, 0, 0, KAction.DENY, True,
                              events.Family.INET, "", 0, unchecked=True))
    r.mon.handle(ConnectEvent(h, events.Family.INET, "10.1.2.3", 443, 6, send=True))
    [claude] = [a for a in r.mon.metrics.snapshot().agents if a.label == "claude-code"]
    counted = [i for i, n in enumerate(claude.connects) if n]
    # one datagram, allowed, to a private address: kind datagram, verdict allowed
    assert counted == [_index("datagram", "allowed", "private")]


def _index(kind: str, verdict: str, destination: str) -> int:
    return ((CONNECT_KINDS.index(kind) * len(CONNECT_VERDICTS) + CONNECT_VERDICTS.index(verdict))
            * len(DESTINATIONS) + DESTINATIONS.index(destination))
