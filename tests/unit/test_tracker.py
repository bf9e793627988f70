"""Unit tests for monitor.sessions.tracker: the session state machine fed with synthetic events."""

from __future__ import annotations

from monitor.model import cmdline
from monitor.model.events import (
    SESSION_KERNEL_BIT,
    STATUS_UNSET,
    ConnectEvent,
    ExecEvent,
    ExecFlag,
    ExitEvent,
    Family,
    ForkEvent,
)
from monitor.sessions.tracker import HISTORY_CHARS, ConnectRecord, ExecRecord, Tracker
from tests.support.events import (
    NO_FLAGS,
    S1,
    S2,
    connect_event,
    exec_event,
    exit_event,
    fork_event,
)

AGENTS = ["claude-code", "codex"]


def names(idx: int) -> str:
    return AGENTS[idx] if idx < len(AGENTS) else f"agent-{idx}"


def exec_ev(pid: int, ts: int, filename: str, argv: tuple[str, ...], *, comm: str = "claude",
            ppid: int = 0, flags: ExecFlag = NO_FLAGS, session: int = S1, agent: int = 0,
            ) -> ExecEvent:
    return exec_event(pid, ts, argv, exe=filename, comm=comm, ppid=ppid, flags=flags,
                      session=session, agent=agent)


def fork_ev(pid: int, child: int, ts: int, session: int = S1, comm: str = "claude") -> ForkEvent:
    return fork_event(pid, child, ts, comm=comm, session=session)


def exit_ev(pid: int, ts: int, status: int = 0, cpu_ns: int = 0, session: int = S1,
            ppid: int = 0) -> ExitEvent:
    return exit_event(pid, ts, status=status, cpu_ns=cpu_ns, ppid=ppid, comm="claude",
                      session=session)


def connect_ev(pid: int, ts: int, address: str = "1.2.3.4", port: int = 443,
               protocol: int = 6, session: int = S1) -> ConnectEvent:
    return connect_event(pid, ts, address, port, protocol=protocol, comm="claude",
                         session=session)


def root_exec(t: Tracker, pid: int = 100, session: int = S1, agent: int = 0) -> None:
    t.apply(exec_ev(pid, 1_000, "/usr/local/bin/claude", ("claude", "--resume"),
                    flags=ExecFlag.NEW_ROOT, session=session, agent=agent))


def test_first_event_of_kernel_session_creates_it() -> None:
    t = Tracker(names)
    assert t.sessions() == []
    p = t.apply(exec_ev(100, 1_000, "/usr/local/bin/codex", ("codex",),
                        flags=ExecFlag.NEW_ROOT, agent=1, comm="codex"))
    assert p is not None and p.pid == 100
    s = t.session(S1)
    assert s is not None
    assert [x.id for x in t.sessions()] == [S1]
    assert s.agent == "codex"
    assert s.root_pid == 100
    assert s.started_ns == 1_000
    assert s.live and set(s.processes) == {100}
    assert p.exe == "/usr/local/bin/codex" and p.argv == ("codex",) and p.comm == "codex"
    assert p.uid == 1000 and p.session == S1


def test_fork_child_inherits_and_links_to_parent() -> None:
    t = Tracker(names)
    root_exec(t)
    t.apply(fork_ev(100, 101, 2_000))
    child = t.process(101)
    assert child is not None
    assert child.ppid == 100
    assert child.session == S1
    assert (child.comm, child.exe, child.argv) == ("claude", "/usr/local/bin/claude",
                                                   ("claude", "--resume"))
    assert child.start_ns == 2_000
    s = t.session(S1)
    assert s is not None
    assert set(s.processes) == {100, 101}
    assert s.forks == 1
    assert list(child.execs) == []  # the child has not exec'd yet


def test_exec_updates_exe_argv_and_history() -> None:
    t = Tracker(names)
    root_exec(t)
    t.apply(fork_ev(100, 101, 2_000))
    t.apply(exec_ev(101, 3_000, "/usr/bin/git", ("git", "status"), comm="git", ppid=100))
    t.apply(exec_ev(101, 4_000, "/usr/bin/less", ("less",), comm="less", ppid=100,
                    flags=ExecFlag.ARGV_TRUNC_LEN))
    p = t.process(101)
    assert p is not None
    assert (p.comm, p.exe, p.argv) == ("less", "/usr/bin/less", ("less",))
    assert list(p.execs) == [
        ExecRecord(3_000, "/usr/bin/git", ("git", "status"), False),
        ExecRecord(4_000, "/usr/bin/less", ("less",), True),
    ]
    s = t.session(S1)
    assert s is not None and s.execs == 3  # the root's exec and two in the child
    root = t.process(100)
    assert root is not None and root.exe == "/usr/local/bin/claude"  # parent untouched


def test_exec_without_captured_argv_keeps_previous_argv() -> None:
    t = Tracker(names)
    root_exec(t)
    t.apply(exec_ev(100, 2_000, "/usr/bin/node", (), flags=ExecFlag.ARGV_MISSING))
    p = t.process(100)
    assert p is not None
    assert p.exe == "/usr/bin/node"
    assert p.argv == ("claude", "--resume")


def test_history_is_bounded() -> None:
    t = Tracker(names, history=3)
    root_exec(t)
    for i in range(10):
        t.apply(exec_ev(100, 2_000 + i, f"/bin/x{i}", (f"x{i}",)))
        t.apply(connect_ev(100, 3_000 + i, port=1000 + i))
    p = t.process(100)
    assert p is not None
    assert [e.filename for e in p.execs] == ["/bin/x7", "/bin/x8", "/bin/x9"]
    assert [c.port for c in p.connects] == [1007, 1008, 1009]
    s = t.session(S1)
    assert s is not None and s.execs == 11 and s.connects == 10  # counters are not bounded
    # a child forked later gets bounded history too
    t.apply(fork_ev(100, 101, 5_000))
    for i in range(5):
        t.apply(exec_ev(101, 6_000 + i, f"/bin/y{i}", (f"y{i}",)))
    child = t.process(101)
    assert child is not None and [e.filename for e in child.execs] == [
        "/bin/y2", "/bin/y3", "/bin/y4"]


def argv_chars(argv: tuple[str, ...]) -> int:
    return sum(len(a) + 1 for a in argv)


def test_what_a_process_keeps_of_its_command_lines_is_bounded() -> None:
    """Multi-megabyte command lines completed from /proc, exec'd again and again: the
    process keeps KEEP_CHARS of the last one and HISTORY_CHARS of each in its history."""
    t = Tracker(names, history=32)
    root_exec(t)
    for i in range(100):
        argv = ("python3", "-c", str(i) + "B" * 6_000_000, "-R", "9000:localhost:22")
        t.apply(exec_ev(100, 2_000 + i, "/usr/bin/python3", argv,
                        flags=ExecFlag.ARGV_TRUNC_LEN | ExecFlag.ARGV_COMPLETED))
    t.apply(fork_ev(100, 101, 9_000))
    for pid in (100, 101):
        p = t.process(pid)
        assert p is not None
        assert argv_chars(p.argv) <= cmdline.KEEP_CHARS + 100
        assert p.argv[-2:] == ("-R", "9000:localhost:22")  # the end of it shows
    p = t.process(100)
    assert p is not None and len(p.execs) == 32
    assert all(argv_chars(e.argv) <= HISTORY_CHARS + 100 for e in p.execs)
    assert sum(argv_chars(e.argv) for e in p.execs) + argv_chars(p.argv) < 32 * 1024


def test_at_most_max_processes_are_kept_the_oldest_go_first() -> None:
    t = Tracker(names, max_processes=3)
    root_exec(t)  # pid 100, the oldest: its exit was lost, say
    for child in (101, 102, 103):
        t.apply(fork_ev(100, child, 2_000 + child))
    assert [p.pid for p in t.processes()] == [101, 102, 103]
    assert t.evicted == 1
    s = t.session(S1)
    assert s is not None and set(s.processes) == {101, 102, 103}
    # a session whose only process is evicted ends; one added to as it goes stays live
    t2 = Tracker(names, max_processes=1)
    root_exec(t2)
    t2.add_process(S1, 200, 100)
    s2 = t2.session(S1)
    assert s2 is not None and set(s2.processes) == {200} and not t2.ended
    t2.apply(exec_ev(300, 3_000, "/bin/x", ("x",), session=S2))
    assert t2.session(S1) is None and [e.id for e in t2.ended] == [S1]
    assert [p.pid for p in t2.processes()] == [300] and t2.evicted == 2


def test_connect_recorded() -> None:
    t = Tracker(names)
    root_exec(t)
    p = t.apply(connect_ev(100, 2_000, "::1", 8443, 17))
    assert p is not None and p.pid == 100
    assert list(p.connects) == [ConnectRecord(2_000, Family.INET6, "::1", 8443, 17)]
    s = t.session(S1)
    assert s is not None and s.connects == 1


def test_exit_removes_process_and_keeps_its_cpu() -> None:
    t = Tracker(names)
    root_exec(t)
    t.apply(fork_ev(100, 101, 2_000))
    p = t.apply(exit_ev(101, 3_000, status=7 << 8, cpu_ns=500, ppid=100))
    assert p is not None and p.exit_status == 7 << 8 and p.cpu_ns == 500
    assert t.process(101) is None
    s = t.session(S1)
    assert s is not None
    assert set(s.processes) == {100}
    assert s.exits == 1
    assert s.exited_cpu_ns == 500
    assert s.live and s.ended_ns is None
    t.set_cpu([(100, 250)])
    assert s.cpu_ns == 750


def test_session_ends_when_last_process_exits() -> None:
    t = Tracker(names)
    root_exec(t)
    t.apply(fork_ev(100, 101, 2_000))
    t.apply(exit_ev(100, 3_000, cpu_ns=1_000))  # the root exits first: the session lives on
    s = t.session(S1)
    assert s is not None and set(s.processes) == {101}
    assert list(t.ended) == []
    t.apply(exit_ev(101, 4_000, status=9, cpu_ns=300, ppid=100))
    assert t.session(S1) is None
    assert t.sessions() == []
    assert [x.id for x in t.ended] == [S1]
    ended = t.ended[0]
    assert ended.ended_ns == 4_000
    assert not ended.live
    assert ended.cpu_ns == 1_300
    assert ended.exits == 2
    assert list(t.processes()) == []


def test_ended_sessions_are_bounded() -> None:
    t = Tracker(names, ended_kept=2)
    for i in range(1, 5):
        sid = SESSION_KERNEL_BIT | i
        root_exec(t, pid=100 + i, session=sid)
        t.apply(exit_ev(100 + i, 10_000 + i, session=sid))
    assert [s.id for s in t.ended] == [SESSION_KERNEL_BIT | 3, SESSION_KERNEL_BIT | 4]


def test_exit_cpu_from_kernel_does_not_lower_known_cpu() -> None:
    t = Tracker(names)
    root_exec(t)
    t.apply(fork_ev(100, 101, 2_000))
    t.set_cpu([(101, 900)])
    t.apply(exit_ev(101, 3_000, cpu_ns=400, status=STATUS_UNSET))
    s = t.session(S1)
    assert s is not None and s.exited_cpu_ns == 900


def test_ancestry_nearest_first_up_to_root() -> None:
    t = Tracker(names)
    root_exec(t)
    t.apply(fork_ev(100, 101, 2_000))
    t.apply(fork_ev(101, 102, 3_000))
    t.apply(fork_ev(102, 103, 4_000))
    t.apply(fork_ev(100, 104, 5_000))  # a sibling branch: not an ancestor of 103
    assert [p.pid for p in t.ancestry(103)] == [103, 102, 101, 100]
    assert [p.pid for p in t.ancestry(104)] == [104, 100]
    assert [p.pid for p in t.ancestry(100)] == [100]
    assert t.ancestry(999) == []
    t.apply(exit_ev(101, 6_000))  # a gap in the chain stops the walk there
    assert [p.pid for p in t.ancestry(103)] == [103, 102]


def test_untracked_events_are_ignored() -> None:
    t = Tracker(names)
    for ev in (
        exec_ev(500, 1, "/bin/ls", ("ls",), session=0, flags=ExecFlag.UNTRACKED),
        fork_ev(500, 501, 2, session=0),
        connect_ev(500, 3, session=0),
        exit_ev(500, 4, session=0),
    ):
        assert t.apply(ev) is None
    assert t.sessions() == []
    assert list(t.processes()) == []
    assert list(t.ended) == []


def test_set_cpu_only_raises() -> None:
    t = Tracker(names)
    root_exec(t)
    t.set_cpu([(100, 1_000), (999, 5_000)])  # unknown pids are ignored
    p = t.process(100)
    assert p is not None and p.cpu_ns == 1_000
    t.set_cpu([(100, 400)])
    assert p.cpu_ns == 1_000
    t.set_cpu([(100, 1_500)])
    assert p.cpu_ns == 1_500
    assert t.process(999) is None


def test_events_of_a_process_seen_first_mid_session() -> None:
    # the exec event of a child may be the first thing seen of it (fork lost): it joins
    t = Tracker(names)
    root_exec(t)
    p = t.apply(exec_ev(150, 2_000, "/usr/bin/rg", ("rg", "x"), comm="rg", ppid=100))
    assert p is not None and p.ppid == 100 and p.session == S1
    assert [x.pid for x in t.ancestry(150)] == [150, 100]


def test_pid_reused_by_another_session_replaces_old_process() -> None:
    t = Tracker(names)
    root_exec(t, pid=100, session=S1)
    t.apply(fork_ev(100, 101, 2_000))
    # 101's exit was lost; the pid now belongs to a process of a new kernel session
    p = t.apply(exec_ev(101, 3_000, "/usr/local/bin/codex", ("codex",), comm="codex",
                        flags=ExecFlag.NEW_ROOT, session=S2, agent=1))
    assert p is not None and p.session == S2
    assert t.process(101) is p
    old = t.session(S1)
    new = t.session(S2)
    assert old is not None and new is not None
    assert set(old.processes) == {100}
    assert set(new.processes) == {101}
    assert new.agent == "codex" and new.root_pid == 101
    assert p.execs[-1].filename == "/usr/local/bin/codex"
    assert p.exe == "/usr/local/bin/codex"
    # the old session is still whole: its root exits and it ends normally
    t.apply(exit_ev(100, 4_000, session=S1))
    assert [s.id for s in t.ended] == [S1]
    assert t.session(S2) is not None and t.process(101) is p


def test_pid_reuse_ends_a_session_that_had_only_that_process() -> None:
    t = Tracker(names)
    root_exec(t, pid=100, session=S1)
    t.apply(exec_ev(100, 5_000, "/usr/local/bin/codex", ("codex",), comm="codex",
                    flags=ExecFlag.NEW_ROOT, session=S2, agent=1))
    assert t.session(S1) is None
    assert [s.id for s in t.ended] == [S1]
    assert not t.ended[0].live
    assert t.ended[0].ended_ns is not None
    s2 = t.session(S2)
    assert s2 is not None and set(s2.processes) == {100}


def test_session_ended_by_pid_reuse_has_a_plausible_end_time() -> None:
    t = Tracker(names)
    root_exec(t, pid=100, session=S1)
    t.apply(exec_ev(100, 5_000, "/usr/local/bin/codex", ("codex",), comm="codex",
                    flags=ExecFlag.NEW_ROOT, session=S2, agent=1))
    ended = t.ended[0]
    # not 0 ("ended at boot"): between its start and when the pid was seen reused
    assert ended.ended_ns is not None and ended.started_ns <= ended.ended_ns <= 5_000


def test_start_session_and_add_process_for_adoption() -> None:
    t = Tracker(names)
    s = t.start_session(7, "aider", 300, 10)
    assert t.start_session(7, "other", 999, 20) is s  # idempotent: first one wins
    t.add_process(7, 300, 0, comm="python3", exe="/usr/bin/python3",
                  argv=("python3", "-m", "aider"), uid=1000)
    t.add_process(7, 301, 300, comm="git")
    assert [p.pid for p in t.ancestry(301)] == [301, 300]
    # userspace session ids (no kernel bit) are used by events exactly like kernel ones
    t.apply(exit_ev(301, 30, session=7))
    assert set(s.processes) == {300}
