"""Kernel tests: real probes, real processes, one shared monitor (see conftest.py).

Each test starts its agent through `agentwatch exec`, the path a user takes, and checks what
a user of `agentwatch trace` would check: the right events, for the right processes, with
the right arguments, addresses and results — and nothing for processes that are not agents.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import Running, agent_exec, wait_exit

from monitor.model.events import (
    ARGS_SIZE,
    ConnectEvent,
    Counter,
    ExecEvent,
    ExecFlag,
    ExitEvent,
    Family,
    ForkEvent,
)


def execs_of(r: Running, pid: int) -> list[ExecEvent]:
    return [e for e in r.log.for_pid(pid) if isinstance(e, ExecEvent)]


def test_exec_argv_of_a_process_that_exits_at_once(running: Running) -> None:
    p = agent_exec(["/bin/true", "alpha", "beta gamma", ""])
    assert wait_exit(p) == 0
    ev, agent = running.log.wait_for(
        lambda e, a: isinstance(e, ExecEvent) and e.h.pid == p.pid and e.filename == "/bin/true")
    assert agent == "test"
    assert isinstance(ev, ExecEvent)
    assert ev.argv == ("/bin/true", "alpha", "beta gamma", "")
    assert not ev.argv_truncated
    ex, _ = running.log.wait_for(lambda e, a: isinstance(e, ExitEvent) and e.h.pid == p.pid)
    assert isinstance(ex, ExitEvent) and ex.exit_code == 0


def test_argv_limits_are_flagged_never_silently_cut(running: Running) -> None:
    # argv is read whole from the new program's memory, up to ARGS_SIZE bytes in all
    exact = ["/bin/true", "x" * 1000] + [str(i) for i in range(200)]  # long and many: fits
    fill = ARGS_SIZE - len("/bin/true") - 2  # the last NUL lands on the last byte
    full = ["/bin/true", "z" * fill]
    over_len = ["/bin/sh", "-c", "sleep 1", "y" * 3000]  # alive while the monitor looks
    results = {}
    for name, argv in (("exact", exact), ("full", full), ("len", over_len)):
        p = agent_exec(argv)
        assert wait_exit(p) == 0
        ev, _ = running.log.wait_for(
            lambda e, a, pid=p.pid, path=argv[0]: isinstance(e, ExecEvent) and e.h.pid == pid
            and e.filename == path)
        assert isinstance(ev, ExecEvent)
        results[name] = ev
    assert results["exact"].argv == tuple(exact)
    assert not results["exact"].argv_truncated
    assert results["full"].argv == tuple(full)
    assert not results["full"].argv_truncated
    # the probes kept ARGS_SIZE bytes and said so; the monitor read the rest from /proc
    assert results["len"].flags & ExecFlag.ARGV_TRUNC_LEN
    assert results["len"].argv == tuple(over_len)


def test_exec_through_fexecve_reports_the_real_binary(running: Running) -> None:
    code = textwrap.dedent("""
        import os
        fd = os.open("/bin/sleep", os.O_RDONLY)
        os.execve(fd, ["sleep-by-fd", "0.5"], {})
    """)
    p = agent_exec([sys.executable, "-c", code])
    ev, _ = running.log.wait_for(
        lambda e, a: isinstance(e, ExecEvent) and e.h.pid == p.pid
        and e.argv[:1] == ("sleep-by-fd",))
    assert isinstance(ev, ExecEvent)
    assert ev.argv == ("sleep-by-fd", "0.5")
    assert os.path.realpath(ev.filename) == os.path.realpath("/bin/sleep")
    assert wait_exit(p) == 0


def test_connect_ipv4_and_ipv6_address_port_and_result(running: Running) -> None:
    l4 = socket.socket(socket.AF_INET)
    l4.bind(("127.0.0.1", 0))
    l4.listen()
    l6 = socket.socket(socket.AF_INET6)
    l6.bind(("::1", 0))
    l6.listen()
    closed = socket.socket(socket.AF_INET)
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    port4, port6 = l4.getsockname()[1], l6.getsockname()[1]
    code = textwrap.dedent(f"""
        import socket
        a = socket.create_connection(("127.0.0.1", {port4}))
        b = socket.socket(socket.AF_INET6); b.connect(("::1", {port6}))
        c = socket.socket(); print(c.connect_ex(("127.0.0.1", {closed_port})))
        d = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); d.connect(("::1", {closed_port}))
        u = socket.socket(socket.AF_UNIX); u.connect_ex("/nonexistent-agentwatch-test")
    """)
    before = running.monitor.probes.counters()[Counter.CONNECTS]
    p = agent_exec([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    assert wait_exit(p) == 0
    l4.close()
    l6.close()

    def conn(addr: str, port: int) -> ConnectEvent:
        ev, _ = running.log.wait_for(
            lambda e, a: isinstance(e, ConnectEvent) and e.h.pid == p.pid
            and e.address == addr and e.port == port)
        assert isinstance(ev, ConnectEvent)
        return ev

    v4 = conn("127.0.0.1", port4)
    assert v4.family == Family.INET and v4.transport == "tcp"
    v6 = conn("::1", port6)
    assert v6.family == Family.INET6 and v6.transport == "tcp"
    refused = conn("127.0.0.1", closed_port)  # reported as it starts: refused or not
    assert refused.family == Family.INET
    udp = conn("::1", closed_port)
    assert udp.family == Family.INET6 and udp.transport == "udp"
    assert running.monitor.probes.counters()[Counter.CONNECTS] >= before + 4
    assert not any(isinstance(e, ConnectEvent) and e.family not in (Family.INET, Family.INET6)
                   for e in running.log.for_pid(p.pid))


def test_children_stay_in_the_tree_through_double_fork_and_setsid(running: Running,
                                                                  tmp_path: Path) -> None:
    pidfile = tmp_path / "daemon.pid"
    script = f"(setsid sh -c 'echo $$ > {pidfile}; exec sleep 3' &) ; exit 0"
    p = agent_exec(["/bin/sh", "-c", script])
    assert wait_exit(p) == 0
    deadline = time.monotonic() + 5
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert time.monotonic() < deadline, "daemon never wrote its pid"
        time.sleep(0.02)
    daemon = int(pidfile.read_text())
    try:
        root_exec, _ = running.log.wait_for(
            lambda e, a: isinstance(e, ExecEvent) and e.h.pid == p.pid)
        ev, agent = running.log.wait_for(
            lambda e, a: isinstance(e, ExecEvent) and e.h.pid == daemon
            and e.filename.endswith("sleep"))
        assert agent == "test"
        assert ev.h.session == root_exec.h.session
        # reparented away from the agent, still tracked in the kernel under the same session
        with open(f"/proc/{daemon}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid != p.pid
        assert running.monitor.probes.is_tracked(daemon)
        session = running.monitor.tracker.session(ev.h.session)
        assert session is not None and session.root_pid == p.pid
        assert daemon in session.processes
    finally:
        os.kill(daemon, signal.SIGKILL)


def test_exit_code_signal_and_map_entry_freed(running: Running) -> None:
    p = agent_exec(["/bin/sh", "-c", "exit 7"])
    assert wait_exit(p) == 7
    ev, _ = running.log.wait_for(lambda e, a: isinstance(e, ExitEvent) and e.h.pid == p.pid)
    assert isinstance(ev, ExitEvent) and ev.exit_code == 7 and ev.signal is None
    assert not running.monitor.probes.is_tracked(p.pid)

    q = agent_exec(["/bin/sleep", "30"])
    running.log.wait_for(lambda e, a: isinstance(e, ExecEvent) and e.h.pid == q.pid
                         and e.filename == "/bin/sleep")
    q.send_signal(signal.SIGTERM)
    assert wait_exit(q) == -signal.SIGTERM
    ev, _ = running.log.wait_for(lambda e, a: isinstance(e, ExitEvent) and e.h.pid == q.pid)
    assert isinstance(ev, ExitEvent) and ev.signal == signal.SIGTERM and ev.exit_code is None
    assert not running.monitor.probes.is_tracked(q.pid)


def test_untracked_processes_emit_nothing(running: Running, monkeypatch) -> None:
    raw: list[object] = []
    original = running.monitor.handle

    def tap(ev):  # every decoded record, before the monitor filters anything
        raw.append(ev)
        original(ev)

    monkeypatch.setattr(running.monitor, "handle", tap)
    marker = f"untracked-{os.getpid()}-{time.monotonic_ns()}"
    plain = subprocess.run(["/bin/sh", "-c", f"/bin/true {marker}; (sleep 0.01 &); exit 3"])
    assert plain.returncode == 3
    s = socket.socket()
    s.connect_ex(("127.0.0.1", 9))
    s.close()
    # A tracked sentinel afterwards: the ring buffer is ordered, so anything the untracked
    # work had emitted would already be in the log when the sentinel's exit arrives.
    sentinel = agent_exec(["/bin/true", "sentinel"])
    wait_exit(sentinel)
    running.log.wait_for(lambda e, a: isinstance(e, ExitEvent) and e.h.pid == sentinel.pid)
    assert raw, "the tap saw nothing at all: the test would prove nothing"
    for ev in raw:
        assert ev.h.pid == sentinel.pid and ev.h.session != 0, f"untracked event leaked: {ev}"


def test_cpu_time_of_a_cpu_bound_child_matches_proc(running: Running) -> None:
    """Like with like: /proc's utime+stime include what the process burnt before it was
    tracked (`agentwatch exec`'s own Python start-up, before it registered), which the
    kernel's sum never saw. So both are read twice, around the busy loop, while the child
    is blocked (its last slice switched out), and the differences are compared."""
    code = textwrap.dedent("""
        import os, sys, time
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        sys.stdin.readline()
        end = time.process_time() + 1.5
        while time.process_time() < end:
            pass
        sys.stdout.write("done\\n"); sys.stdout.flush()
        sys.stdin.read()
    """)

    def proc_seconds(pid: int) -> float:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def bpf_seconds(pid: int) -> float:
        return {t.pid: t.cpu_ns for t in running.monitor.probes.tracked()}[pid] / 1e9

    p = agent_exec([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdin is not None and p.stdout is not None
        assert p.stdout.readline() == b"ready\n"
        time.sleep(0.1)  # blocked in readline(): its last slice has been switched out
        proc0, bpf0 = proc_seconds(p.pid), bpf_seconds(p.pid)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"done\n"
        time.sleep(0.1)  # now blocked in read()
        proc_s, bpf_s = proc_seconds(p.pid) - proc0, bpf_seconds(p.pid) - bpf0
        assert proc_s >= 1.4
        assert abs(bpf_s - proc_s) <= 0.10 * proc_s, (bpf_s, proc_s)
        running.monitor.tick()
        tracked = running.monitor.tracker.process(p.pid)
        assert tracked is not None
        assert abs(tracked.cpu_ns / 1e9 - bpf0 - proc_s) <= 0.10 * proc_s
    finally:
        assert p.stdin is not None
        p.stdin.close()
        wait_exit(p)


def test_kernel_matcher_makes_a_root_before_its_first_instruction(running: Running,
                                                                  tmp_path: Path) -> None:
    shell = tmp_path / "awkbot"
    shell.write_bytes(Path("/bin/sh").read_bytes())
    shell.chmod(0o755)
    p = subprocess.Popen([str(shell), "-c", "/bin/true child-of-kbot; exit 0"])
    assert wait_exit(p) == 0
    root, agent = running.log.wait_for(lambda e, a: isinstance(e, ExecEvent) and e.h.pid == p.pid)
    assert agent == "kbot"
    assert isinstance(root, ExecEvent) and root.flags & ExecFlag.NEW_ROOT
    # not tracked at syscall entry, yet its argv is exact (read from its new memory)
    assert root.argv == (str(shell), "-c", "/bin/true child-of-kbot; exit 0")
    # its very first fork is already in the tree: nothing ran untracked in between
    fork, _ = running.log.wait_for(lambda e, a: isinstance(e, ForkEvent) and e.h.pid == p.pid)
    child, _ = running.log.wait_for(
        lambda e, a: isinstance(e, ExecEvent) and e.argv[-1:] == ("child-of-kbot",))
    assert isinstance(fork, ForkEvent) and child.h.pid == fork.child_pid
    assert child.h.session == root.h.session


def test_no_ring_buffer_loss_in_these_tests(running: Running) -> None:
    assert running.monitor.probes.counters()[Counter.LOST] == 0
    assert running.monitor.decode_errors == 0


def test_argv_in_pages_a_fresh_fork_child_has_not_touched(running: Running,
                                                          tmp_path: Path) -> None:
    """execve right after fork with argv in .rodata: those pages are not mapped in the child
    yet, so a read at syscall entry faults; the exec hook still reports the exact argv."""
    src = tmp_path / "spawn.c"
    src.write_text(textwrap.dedent("""
        #include <unistd.h>
        #include <sys/wait.h>
        static char *const A[] = {"/bin/true", "--from-rodata", "x", 0};
        static char *const E[] = {0};
        int main(void) {
            pid_t p = fork();
            if (p == 0) { execve(A[0], A, E); _exit(127); }
            int st; waitpid(p, &st, 0);
            return WEXITSTATUS(st);
        }
    """))
    exe = tmp_path / "spawn"
    subprocess.run(["cc", "-O2", "-o", str(exe), str(src)], check=True)
    p = agent_exec([str(exe)])
    assert wait_exit(p) == 0
    fork, _ = running.log.wait_for(lambda e, a: isinstance(e, ForkEvent) and e.h.pid == p.pid)
    assert isinstance(fork, ForkEvent)
    ev, _ = running.log.wait_for(lambda e, a: isinstance(e, ExecEvent)
                                 and e.h.pid == fork.child_pid)
    assert isinstance(ev, ExecEvent) and ev.argv == ("/bin/true", "--from-rodata", "x")


def _compiler_private_kib() -> int:
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping line
            inside = len(head) >= 6 and ("/libLLVM" in head[5] or "/libclang" in head[5])
        elif inside and line.startswith(("Private_Clean:", "Private_Dirty:")):
            total += int(head[1])  # pages only this process maps (another BCC user may share)
    return total


def test_the_compilers_memory_is_given_back_after_loading(running: Running) -> None:
    # BCC's clang/LLVM ran once to build the probes; its pages must not stay resident
    # (docs/benchmarks.md, footprint), and the probes must keep working without them
    running.monitor.probes.bpf.load_func(b"aw_connect4", 18)  # touches LLVM-side code again
    assert _compiler_private_kib() > 0
    assert running.monitor.probes.release_compiler() > 0
    assert _compiler_private_kib() < 16 * 1024
    p = agent_exec(["/bin/true", "after-release"])
    assert wait_exit(p) == 0
    ev, _ = running.log.wait_for(lambda e, a: isinstance(e, ExecEvent) and e.h.pid == p.pid)
    assert isinstance(ev, ExecEvent) and ev.argv == ("/bin/true", "after-release")


def test_cpu_readings_in_one_batch_match_the_map_entry_by_entry(running: Running) -> None:
    # the tick reads every tracked process's CPU with BPF_MAP_LOOKUP_BATCH; it must see
    # exactly what walking the map sees, burner included
    code = ("import os, time\n"
            "for _ in range(200):\n    os.fork() or (time.sleep(5), os._exit(0))\n"
            "end = time.time() + 0.3\nwhile time.time() < end: pass\ntime.sleep(5)\n")
    p = agent_exec([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    probes = running.monitor.probes
    session = None
    try:
        deadline = time.monotonic() + 10
        while session is None:
            session = probes.session_of(p.pid)
            assert time.monotonic() < deadline, "the agent was never tracked"
        while len(probes.session_pids(session)) < 201:
            assert time.monotonic() < deadline, "the 200 children were never all tracked"
            time.sleep(0.05)
        time.sleep(0.5)  # the burner has been switched out: its CPU is in the map
        batch = dict(probes.cpu_readings())
        walked = {t.pid: t.cpu_ns for t in probes.tracked()}
        assert set(batch) == set(walked)
        assert batch[p.pid] >= 200_000_000  # ~0.3 s of CPU burnt
        assert all(batch[pid] <= walked[pid] for pid in batch)  # read first, never more
    finally:
        for pid in probes.session_pids(session) if session is not None else []:
            try:  # the agent and its children, all started by this test
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_exit(p)


def test_a_poll_waiting_for_records_is_woken_from_another_thread() -> None:
    """The daemon's loop waits in poll() for ring-buffer records; a control operation
    handed to it (service/inbox.py) must not wait out that timeout. wake() ends the wait at
    once: a poll asked to wait ten minutes returns as soon as another thread wakes it."""
    import threading

    from monitor.kernel.loader import ProbeOptions, Probes

    probes = Probes(ProbeOptions(max_procs=1024, ringbuf_mib=1))
    probes.open()
    try:
        probes.on_record(lambda raw: None)
        waiter = threading.Thread(target=probes.poll, args=(600_000,), daemon=True)
        waiter.start()
        waiter.join(0.5)
        assert waiter.is_alive(), "poll returned without records or a wakeup"
        probes.wake()
        waiter.join(30)
        assert not waiter.is_alive(), "wake() did not end the poll"
    finally:
        probes.close()
