"""Taking in pending candidates and cut command lines (monitor/sessions/intake.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.kernel.mapio import TrackedProc
from monitor.model import cmdline, events
from monitor.model.events import (
    AGENT_PENDING,
    SESSION_KERNEL_BIT,
    ExecEvent,
    ExecFlag,
)
from monitor.policy.load import load_policy_text
from monitor.service.daemon import Monitor
from monitor.sessions.intake import UNCONFIRMED_LOG_SECONDS
from monitor.sessions.procfs import ProcFS
from tests.support.clock import FakeClock
from tests.support.monitor import (
    AIDER,
    CLAUDE,
    CONFIG,
    ME,
    PENDING,
    B,
    Rig,
    agent_tree,
    config,
    header,
    kernel_candidate,
    make_proc,
    pending_fork,
    rig,
)

# --- events --------------------------------------------------------------------------------


def test_candidate_matching_cmdline_starts_session(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    pid = B + 20  # python3 -m aider
    r.mon.handle(kernel_candidate(r, pid, ("python3", "-m", "aider", "--yes")))
    # accepted: the kernel entry keeps its session and gets the agent's index
    assert r.probes.is_tracked(pid)
    assert r.probes.procs[pid].session == PENDING
    assert r.probes.procs[pid].agent == AIDER
    assert r.probes.untrack_calls == []
    session = r.mon.tracker.session(PENDING)
    assert session is not None and session.agent == "aider" and session.root_pid == pid
    proc = r.mon.tracker.process(pid)
    assert proc is not None and proc.argv == ("python3", "-m", "aider", "--yes")
    assert [e.filename for e in proc.execs] == ["/usr/bin/python3.11"]
    # the sink sees the event as an aider event
    ((ev, agent),) = r.sink
    assert agent == "aider"
    assert isinstance(ev, ExecEvent)
    assert ev.h.session == PENDING and ev.h.agent == AIDER
    assert [s["agent"] for s in r.mon.status()["sessions"]] == ["aider"]
    (log,) = r.log.find("agent session started")
    assert log["via"] == "userspace match" and log["root_pid"] == pid


def test_accepted_candidate_children_are_named_too(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    pid = B + 20
    fork = pending_fork(r, pid, B + 21)  # forked before userspace decided: still pending
    r.mon.handle(kernel_candidate(r, pid, ("python3", "-m", "aider")))
    assert r.probes.procs[B + 21].agent == AGENT_PENDING
    r.mon.handle(fork)
    assert r.probes.procs[B + 21].agent == AIDER
    assert r.probes.procs[B + 21].session == PENDING
    session = r.mon.tracker.session(PENDING)
    assert session is not None and set(session.processes) == {pid, B + 21}
    assert [(type(ev).__name__, agent) for ev, agent in r.sink] == [
        ("ExecEvent", "aider"), ("ForkEvent", "aider")]


def test_candidate_is_judged_on_its_exec_argv(tmp_path: Path) -> None:
    r = rig(tmp_path)
    make_proc(r.proc, B + 50, 1, "python3", argv=("aider-renamed-itself",))
    r.mon.handle(kernel_candidate(r, B + 50, ("python3", "-m", "aider")))
    assert r.probes.procs[B + 50].agent == AIDER
    assert [a for _, a in r.sink] == ["aider"]


def test_candidate_matching_exe_glob(tmp_path: Path) -> None:
    r = rig(tmp_path)
    make_proc(r.proc, B + 51, 1, "goose", exe="/opt/goose/bin/goose")
    make_proc(r.proc, B + 52, 1, "goose", exe="/usr/bin/goose")  # same comm, other exe
    r.mon.handle(kernel_candidate(r, B + 51, ("goose",), comm="goose",
                                  filename="/opt/goose/bin/goose", session=PENDING))
    r.mon.handle(kernel_candidate(r, B + 52, ("goose",), comm="goose",
                                  filename="/usr/bin/goose", session=PENDING + 1))
    assert [(ev.h.pid, a) for ev, a in r.sink] == [(B + 51, "goose")]
    assert r.probes.is_tracked(B + 51) and not r.probes.is_tracked(B + 52)


def test_non_matching_candidate_is_untracked_and_not_reported(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    fork = pending_fork(r, B + 10, B + 11)
    r.mon.handle(kernel_candidate(r, B + 10, ("bash", "-c", "ls"), comm="bash",
                                  filename="/usr/bin/bash"))
    assert r.sink == []
    assert not r.probes.is_tracked(B + 10)
    assert r.mon.tracker.sessions() == []
    # later events of the rejected session (already in the ring) untrack what they name
    r.mon.handle(fork)
    assert not r.probes.is_tracked(B + 11)
    assert r.sink == []
    assert r.probes.track_calls == []
    assert r.mon.events == 2


def test_monitor_is_never_accepted_as_candidate(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.handle(kernel_candidate(r, ME, ("python3", "-m", "aider")))
    assert not r.probes.is_tracked(ME)
    assert r.sink == []
    assert r.mon.tracker.sessions() == []


def test_register_accepts_a_pid_still_in_a_pending_session(tmp_path: Path) -> None:
    # `agentwatch exec` is itself exec'd, so with userspace matchers it is a candidate
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.probes.procs[B + 10] = TrackedProc(B + 10, PENDING, AGENT_PENDING, 0, -1, 0, 0)
    s = r.mon.registry.register(B + 10, "my-tool")
    assert r.probes.procs[B + 10].session == s.id
    assert r.probes.procs[B + 10].agent == r.mon.agents.index("my-tool")


def test_late_rejection_does_not_untrack_a_registered_process(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    ev = kernel_candidate(r, B + 10, ("agentwatch", "exec", "--agent", "my-tool"),
                          comm="agentwatch")
    # the register request is served before the main loop reads the candidate's exec
    s = r.mon.registry.register(B + 10, "my-tool")
    r.mon.handle(ev)
    assert r.probes.is_tracked(B + 10), "the registered agent root was untracked"
    assert r.probes.procs[B + 10].session == s.id




# --- command lines the probes cut ------------------------------------------------------------

ARGV_POLICY = """\
mode: monitor
rules:
  - name: no-ssh-forward
    event: exec
    action: kill
    match: {ssh: [remote_forward]}
  - name: no-stratum
    event: exec
    action: kill
    match: {argv: ['stratum\\+tcp://']}
"""
CUT = ExecFlag.ARGV_FROM_MM | ExecFlag.ARGV_TRUNC_LEN


def argv_rig(tmp_path: Path, clock: FakeClock | None = None) -> Rig:
    r = rig(tmp_path)
    r.mon = Monitor(config(), load_policy_text(ARGV_POLICY, "argv.yaml"), probes=r.probes,
                    procfs=ProcFS(r.proc), sink=lambda ev, agent: r.sink.append((ev, agent)),
                    log=r.log, clock=clock)
    return r


def cut_exec(pid: int, raw: bytes, comm: str = "ssh") -> ExecEvent:
    """The exec as the probes send it: the first ARGS_SIZE bytes of the argument block."""
    kept = raw[: events.ARGS_SIZE]
    return ExecEvent(header(pid, session=SESSION_KERNEL_BIT | 5, agent=CLAUDE, comm=comm),
                     old_tid=pid, ppid=1, cgroup_id=1, flags=CUT, filename=f"/usr/bin/{comm}",
                     argv=tuple(a.decode("utf-8", "surrogateescape")
                                for a in kept.split(b"\0")))


def proc_cmdline(r: Rig, pid: int, raw: bytes, comm: str = "ssh") -> None:
    make_proc(r.proc, pid, 1, comm)
    (r.proc / str(pid) / "cmdline").write_bytes(raw)


SSH_R = b"ssh\0-o\0SendEnv=X\xff" + b"A" * 3000 + b"\0-NR\0009000:localhost:22\0attacker\0"
STRATUM = b"worker\0--label=\xff" + b"A" * 3000 + b"\0--pool\0stratum+tcp://pool:3333\0"


@pytest.mark.parametrize(("raw", "comm", "rule"), [
    (SSH_R, "ssh", "no-ssh-forward"),
    (STRATUM, "worker", "no-stratum"),
    (SSH_R.replace(b"A" * 3000, b"A" * 6_000_000), "ssh", "no-ssh-forward"),
    (b"ssh\0" + b"-v\0" * 600_000 + b"-R\0x\0h\0", "ssh", "no-ssh-forward"),
    (STRATUM.replace(b"A" * 3000 + b"\0", b"A\0" * 600_000), "worker", "no-stratum"),
])
def test_an_invalid_byte_and_padding_do_not_hide_the_rest_of_a_command_line(
        tmp_path: Path, raw: bytes, comm: str, rule: str) -> None:
    r = argv_rig(tmp_path)
    pid = B + 60
    proc_cmdline(r, pid, raw, comm)
    r.mon.handle(cut_exec(pid, raw, comm))
    (v,) = r.log.find("verdict")
    assert v["rule"] == rule and v["pid"] == pid and v["outcome"] == "would kill"
    # judged whole, kept bounded: the process, the event stream and the log line
    proc = r.mon.tracker.process(pid)
    shown = r.sink[-1][0]
    assert proc is not None and isinstance(shown, ExecEvent)
    for argv in (proc.argv, shown.argv, v["argv"]):
        assert sum(len(a) + 1 for a in argv) <= cmdline.KEEP_CHARS + 100
    assert not r.log.find("command line judged on the probes' cut copy")


@pytest.mark.parametrize(("shown", "reason"), [(b"sleep\x005\0", "changed"), (None, "gone")])
def test_a_cut_command_line_proc_cannot_confirm_is_counted_and_said(
        tmp_path: Path, shown: bytes | None, reason: str) -> None:
    r = argv_rig(tmp_path)
    pid = B + 61
    if shown is not None:
        proc_cmdline(r, pid, shown)
    for _ in range(3):
        r.mon.handle(cut_exec(pid, SSH_R))
    assert not r.log.find("verdict")  # the first 2,560 bytes hold no forward: not judged so
    assert r.mon.metrics.argv_unconfirmed() == {("claude-code", reason): 3}
    (said,) = r.log.find("command line judged on the probes' cut copy")  # once per 10 s
    assert said["reason"] == reason and said["pid"] == pid and said["agent"] == "claude-code"
    assert said["rules"] == ["no-ssh-forward", "no-stratum"]
    assert said["judged_bytes"] == events.ARGS_SIZE
    (ev, _), *_ = r.sink
    assert isinstance(ev, ExecEvent) and ev.argv_truncated


def test_an_unconfirmed_command_line_is_said_again_after_the_quiet_window(
        tmp_path: Path) -> None:
    clock = FakeClock()
    r = argv_rig(tmp_path, clock)
    said = "command line judged on the probes' cut copy"
    for _ in range(3):
        r.mon.handle(cut_exec(B + 61, SSH_R))
        clock.advance(UNCONFIRMED_LOG_SECONDS / 4)
    assert [f["unsaid"] for f in r.log.find(said)] == [0]
    clock.advance(UNCONFIRMED_LOG_SECONDS / 4)  # 10 s after the first: said again
    r.mon.handle(cut_exec(B + 61, SSH_R))
    assert [f["unsaid"] for f in r.log.find(said)] == [0, 2]
    assert r.mon.metrics.argv_unconfirmed() == {("claude-code", "gone"): 4}


def test_the_monitor_keeps_at_most_max_processes_and_says_how_many_it_let_go(
        tmp_path: Path) -> None:
    r = rig(tmp_path, config(CONFIG.replace("  history: 4\n",
                                            "  history: 4\n  max_processes: 1024\n")))
    sid = SESSION_KERNEL_BIT | 9
    for pid in range(B, B + 1030):  # exits lost, say: nothing ever drops them
        r.mon.handle(ExecEvent(header(pid, session=sid, agent=CLAUDE), old_tid=pid, ppid=1,
                               cgroup_id=1, flags=0, filename="/bin/true", argv=("true",)))
    st = r.mon.status()
    assert sum(s["processes"] for s in st["sessions"]) == 1024
    assert st["processes_evicted"] == 6
