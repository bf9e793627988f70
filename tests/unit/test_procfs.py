"""Unit tests for monitor.sessions.procfs against fixture /proc trees (and once against the
real /proc)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from monitor.model import cmdline
from monitor.sessions.procfs import (
    PF_KTHREAD,
    Adoption,
    ProcFS,
    ProcInfo,
    clock_ticks,
    plan_adoption,
)
from tests.support.procfs import make_proc, stat_line


def kthread(root: Path, pid: int, comm: str, ppid: int = 2) -> None:
    make_proc(root, pid, ppid, comm, flags=PF_KTHREAD | 0x40, argv=(), exe=None, cgroup="0::/\n")


# ---------------------------------------------------------------- reading one process


def test_stat_comm_with_spaces_and_parens(tmp_path: Path) -> None:
    make_proc(tmp_path, 42, 7, "a) b (c", start=987654)
    info = ProcFS(tmp_path).read(42)
    assert info is not None
    assert info.comm == "a) b (c"
    assert info.ppid == 7
    assert info.start_ticks == 987654
    assert not info.kernel_thread
    assert ProcFS(tmp_path).start_ticks(42) == 987654


def test_full_record(tmp_path: Path) -> None:
    make_proc(
        tmp_path,
        300,
        1,
        "python3",
        uid=1234,
        argv=("python3", "-c", "print('a b')", ""),
        cgroup="12:pids:/foo\n1:name=systemd:/bar\n0::/user.slice/user-1234.slice/x:y.scope\n",
        exe="/usr/bin/python3.11 (deleted)",
    )
    assert ProcFS(tmp_path).read(300) == ProcInfo(
        pid=300,
        ppid=1,
        comm="python3",
        exe="/usr/bin/python3.11",
        argv=("python3", "-c", "print('a b')", ""),
        uid=1234,
        cgroup="/user.slice/user-1234.slice/x:y.scope",
        start_ticks=1300,
        kernel_thread=False,
    )


def test_cmdline_split_on_nul(tmp_path: Path) -> None:
    d = make_proc(tmp_path, 10, 1)
    d.joinpath("cmdline").write_bytes(b"node\0/opt/agent.js\0--flag=x y\0")
    info = ProcFS(tmp_path).read(10)
    assert info is not None and info.argv == ("node", "/opt/agent.js", "--flag=x y")
    d.joinpath("cmdline").write_bytes(b"")
    info = ProcFS(tmp_path).read(10)
    assert info is not None and info.argv == ()


def test_uid_is_real_uid(tmp_path: Path) -> None:
    make_proc(tmp_path, 11, 1, uid=501)
    info = ProcFS(tmp_path).read(11)
    assert info is not None and info.uid == 501


def test_cgroup_without_unified_line_is_empty(tmp_path: Path) -> None:
    make_proc(tmp_path, 12, 1, cgroup="4:memory:/m\n3:cpu,cpuacct:/c\n")
    info = ProcFS(tmp_path).read(12)
    assert info is not None and info.cgroup == ""


def test_missing_exe_is_empty_string(tmp_path: Path) -> None:
    make_proc(tmp_path, 13, 1, exe=None)
    info = ProcFS(tmp_path).read(13)
    assert info is not None and info.exe == ""


def test_kernel_threads(tmp_path: Path) -> None:
    make_proc(tmp_path, 2, 0, "kthreadd", argv=(), exe=None)  # no PF_KTHREAD in fixture
    make_proc(tmp_path, 30, 2, "kworker/0:1", argv=(), exe=None)  # child of 2, no flag
    kthread(tmp_path, 31, "rcu_sched", ppid=5)  # flag only
    make_proc(tmp_path, 32, 1, "bash", flags=0x00400100)  # other flags, not PF_KTHREAD
    fs = ProcFS(tmp_path)
    kinds = {pid: info.kernel_thread for pid, info in fs.scan().items()}
    assert kinds == {2: True, 30: True, 31: True, 32: False}


def test_bytes_that_are_not_utf8_decode_as_the_ring_decoder_does(tmp_path: Path) -> None:
    d = make_proc(tmp_path, 14, 1, exe=None, cgroup="")
    d.joinpath("stat").write_bytes(b"14 (ev\xffl) " + stat_line(14, "x", 1).split(") ", 1)[1]
                                   .encode())
    d.joinpath("cmdline").write_bytes(b"ssh\0-oSendEnv=\xff\xc3\0")
    d.joinpath("cgroup").write_bytes(b"0::/agents/\xfe.scope\n")
    os.symlink(b"/tmp/\xfd/ssh", os.fsencode(d / "exe"))
    info = ProcFS(tmp_path).read(14)
    assert info is not None
    assert info.comm == cmdline.decode(b"ev\xffl") == "ev\udcffl"
    assert info.argv == ("ssh", "-oSendEnv=\udcff\udcc3")  # not U+FFFD: lossless
    assert info.exe == "/tmp/\udcfd/ssh"
    assert info.cgroup == "/agents/\udcfe.scope"


def test_cmdline_is_read_up_to_the_kernels_argv_limit(tmp_path: Path) -> None:
    """A 6 MiB command line (the most the kernel lets exec take) is read whole; anything
    beyond READ_MAX (only CAP_SYS_RESOURCE can make that) is not read and says so."""
    d = make_proc(tmp_path, 15, 1)
    six = b"ssh\0" + b"A" * (6 * 1024 * 1024) + b"\0-R\0009:x:22\0h\0"
    d.joinpath("cmdline").write_bytes(six)
    info = ProcFS(tmp_path).read(15)
    assert info is not None and not info.cmdline_cut and not info.argv_clipped
    assert info.argv[-3:] == ("-R", "9:x:22", "h") and info.cmdline == six
    d.joinpath("cmdline").write_bytes(b"x\0" * (cmdline.READ_MAX // 2 + 1000))
    info = ProcFS(tmp_path).read(15)
    assert info is not None and info.cmdline_cut and len(info.cmdline) == cmdline.READ_MAX


def test_a_command_line_of_very_many_arguments_is_clipped_not_split(tmp_path: Path) -> None:
    d = make_proc(tmp_path, 16, 1)
    raw = b"ssh\0" + b"-v\0" * 600_000 + b"-R\0009:x:22\0h\0"
    d.joinpath("cmdline").write_bytes(raw)
    info = ProcFS(tmp_path).read(16)
    assert info is not None and info.argv_clipped
    assert sum(len(a) for a in info.argv) <= cmdline.KEEP_CHARS
    assert info.argv[-3:] == ("-R", "9:x:22", "h")
    assert info.line == cmdline.join(raw) and info.line.endswith(" -v -R 9:x:22 h")


@pytest.mark.parametrize("missing", ["stat", "status", "cmdline"])
def test_vanished_process_is_skipped(tmp_path: Path, missing: str) -> None:
    make_proc(tmp_path, 1, 0, "init")
    d = make_proc(tmp_path, 50, 1, "gone")
    d.joinpath(missing).unlink()
    fs = ProcFS(tmp_path)
    assert fs.read(50) is None
    assert sorted(fs.scan()) == [1]


def test_pid_recycled_mid_read_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_proc(tmp_path, 51, 1, start=500)
    fs = ProcFS(tmp_path)
    monkeypatch.setattr(fs, "start_ticks", lambda pid: 501)  # a new process took pid 51
    assert fs.read(51) is None


def test_empty_pid_directory_and_absent_pid(tmp_path: Path) -> None:
    (tmp_path / "77").mkdir()
    fs = ProcFS(tmp_path)
    assert fs.read(77) is None
    assert fs.read(78) is None
    assert fs.start_ticks(77) is None
    assert fs.start_ticks(78) is None
    assert fs.scan() == {}


def test_malformed_stat_is_skipped(tmp_path: Path) -> None:
    d = make_proc(tmp_path, 60, 1)
    d.joinpath("stat").write_text("60 (truncated")
    assert ProcFS(tmp_path).read(60) is None
    d.joinpath("stat").write_text("60 (short) S 1 60\n")
    assert ProcFS(tmp_path).read(60) is None
    assert ProcFS(tmp_path).start_ticks(60) is None


def test_pids_only_numeric(tmp_path: Path) -> None:
    for name in ("1", "12", "self", "thread-self", "sys", "net", "003x", "²"):
        (tmp_path / name).mkdir()
    (tmp_path / "uptime").write_text("1 1\n")
    assert ProcFS(tmp_path).pids() == [1, 12]


# ---------------------------------------------------------------- trees


def build_tree(root: Path) -> None:
    r"""
    1 init
    ├── 100 agent
    │   ├── 101 bash
    │   │   └── 103 python
    │   │       └── 104 sh
    │   └── 102 git
    ├── 200 orphan   (was a grandchild of 100, reparented to 1)
    └── 300 other
    2 kthreadd
    └── 20 kworker
    """
    make_proc(root, 1, 0, "systemd")
    make_proc(root, 100, 1, "agent")
    make_proc(root, 101, 100, "bash")
    make_proc(root, 102, 100, "git")
    make_proc(root, 103, 101, "python")
    make_proc(root, 104, 103, "sh")
    make_proc(root, 200, 1, "orphan")
    make_proc(root, 300, 1, "other")
    kthread(root, 2, "kthreadd", ppid=0)
    kthread(root, 20, "kworker")


def test_children_map(tmp_path: Path) -> None:
    build_tree(tmp_path)
    fs = ProcFS(tmp_path)
    children = fs.children_map(fs.scan())
    assert children[1] == [100, 200, 300]
    assert children[100] == [101, 102]
    assert children[0] == [1, 2]


def test_descendants_breadth_first_excluding_orphan(tmp_path: Path) -> None:
    build_tree(tmp_path)
    fs = ProcFS(tmp_path)
    assert fs.descendants(100) == [101, 102, 103, 104]
    assert fs.descendants(100, fs.scan()) == [101, 102, 103, 104]
    assert 200 not in fs.descendants(100)
    assert fs.descendants(104) == []
    assert fs.descendants(999) == []
    assert fs.descendants(1)[:3] == [100, 200, 300]


def test_descendants_survive_cycles(tmp_path: Path) -> None:
    make_proc(tmp_path, 5, 7)
    make_proc(tmp_path, 6, 5)
    make_proc(tmp_path, 7, 6)
    make_proc(tmp_path, 8, 8)  # its own parent
    fs = ProcFS(tmp_path)
    assert fs.descendants(5) == [6, 7]
    assert fs.descendants(8) == []


# ---------------------------------------------------------------- adoption


def agent_named(*names: str) -> Callable[[ProcInfo], str | None]:
    def is_root(info: ProcInfo) -> str | None:
        return info.comm if info.comm in names else None

    return is_root


def test_plan_adoption_basic(tmp_path: Path) -> None:
    build_tree(tmp_path)
    plan = plan_adoption(ProcFS(tmp_path).scan(), agent_named("agent"))
    assert [(a.pid, a.root_pid, a.agent) for a in plan] == [
        (100, 100, "agent"),
        (101, 100, "agent"),
        (102, 100, "agent"),
        (103, 100, "agent"),
        (104, 100, "agent"),
    ]
    assert plan[0] == Adoption(pid=100, ppid=1, root_pid=100, agent="agent", start_ticks=1100)
    assert plan[3].ppid == 101


def test_plan_adoption_nested_root_folds_into_outer(tmp_path: Path) -> None:
    build_tree(tmp_path)
    # "python" (103) would be a root by itself, but its ancestor 100 is one already.
    plan = plan_adoption(ProcFS(tmp_path).scan(), agent_named("agent", "python"))
    assert {a.pid: (a.root_pid, a.agent) for a in plan} == {
        pid: (100, "agent") for pid in (100, 101, 102, 103, 104)
    }
    # ...and 103 is a root of its own when 100 is not one.
    plan = plan_adoption(ProcFS(tmp_path).scan(), agent_named("python"))
    assert [(a.pid, a.root_pid, a.agent) for a in plan] == [
        (103, 103, "python"),
        (104, 103, "python"),
    ]


def test_plan_adoption_parents_before_children(tmp_path: Path) -> None:
    build_tree(tmp_path)
    make_proc(tmp_path, 50, 300, "agent")  # a second, deeper agent root: 300 -> 50 -> 51
    make_proc(tmp_path, 51, 50, "cat")
    infos = ProcFS(tmp_path).scan()
    plan = plan_adoption(infos, agent_named("agent"))
    order = [a.pid for a in plan]
    assert order == [100, 50, 101, 102, 51, 103, 104]
    position = {pid: i for i, pid in enumerate(order)}
    for a in plan:
        if a.pid != a.root_pid:
            assert position[a.ppid] < position[a.pid]
    assert {a.pid: a.root_pid for a in plan}[51] == 50


def test_plan_adoption_excludes_monitor_pid1_and_kernel_threads(tmp_path: Path) -> None:
    build_tree(tmp_path)
    make_proc(tmp_path, 110, 100, "agentwatch")  # the monitor, started inside the agent tree
    make_proc(tmp_path, 111, 110, "helper")  # the monitor's own child
    infos = ProcFS(tmp_path).scan()
    everything = agent_named("systemd", "kthreadd", "kworker", "agent", "agentwatch", "helper")
    plan = plan_adoption(infos, everything, exclude={110})
    pids = [a.pid for a in plan]
    assert 1 not in pids
    assert 2 not in pids and 20 not in pids
    assert 110 not in pids
    # the monitor's child is not adopted into the agent's tree; it would only be a root itself
    assert {a.pid: a.root_pid for a in plan}[111] == 111
    assert {a.pid: a.root_pid for a in plan}[101] == 100
    # excluding the agent (an ancestor of the monitor) keeps it from becoming a root
    plan = plan_adoption(infos, agent_named("agent"), exclude={110, 100, 1})
    assert plan == []


def test_plan_adoption_survives_cycles(tmp_path: Path) -> None:
    make_proc(tmp_path, 5, 7, "agent")
    make_proc(tmp_path, 6, 5)
    make_proc(tmp_path, 7, 6)
    plan = plan_adoption(ProcFS(tmp_path).scan(), agent_named("agent"))
    assert sorted(a.pid for a in plan) == [5, 6, 7]
    assert {a.root_pid for a in plan} == {5}


# ---------------------------------------------------------------- the real /proc


def test_real_proc_reads_this_process() -> None:
    fs = ProcFS()
    info = fs.read(os.getpid())
    assert info is not None
    assert info.pid == os.getpid()
    assert info.ppid == os.getppid()
    assert info.uid == os.getuid()
    assert info.argv[0] == sys.orig_argv[0]
    assert info.exe == os.path.realpath(sys.executable)
    assert not info.kernel_thread
    raw = Path(f"/proc/{os.getpid()}/stat").read_text()
    expected = int(raw[raw.rindex(")") + 1 :].split()[19])
    assert info.start_ticks == expected
    assert fs.start_ticks(os.getpid()) == expected
    assert os.getpid() in fs.pids()
    assert clock_ticks() > 0
