"""Fileless and deleted executables, and names the kernel sees through, on real processes.

An agent that runs a program from a memfd (memfd_create + fexecve, execveat(fd, "",
AT_EMPTY_PATH), execve("/proc/self/fd/N")), from a deleted file or from an O_TMPFILE file,
or through a symlink whose own name is innocent, is judged by the executable's file: its
name (memfd: stripped) meets the name rules, and a file with no links is `fileless`. Both
are decided in the kernel at exec, before the program's first instruction: the payload
here is a copy of touch(1), so "it ran" is a marker file, and a killed exec leaves none.
The same steps by a process that is not an agent run to the end.

The exec'ing code is a small C program compiled here with cc (memexec below).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AS_AGENT, Running, agent_exec, running_policy, wait_exit

from monitor.model.events import ExecEvent, ExecFlag
from monitor.policy.load import default_policy, load_policy_text

SOCK = "/run/agentwatch-test/fileless.sock"
DEFAULT_SOCK = "/run/agentwatch-test/fileless-default.sock"
TOUCH = shutil.which("touch") or "/usr/bin/touch"

POLICY = """
mode: enforce
agents:
  - name: named
    match: [{comm: awflnamed}]
  - name: strict
    match: [{comm: awflstrict}]
rules:
  - name: no-miners
    event: exec
    action: kill
    match: {name: [xmrig, xmrig-test]}
  - name: no-fileless
    event: exec
    agents: [strict]
    action: kill
    match: {fileless: true}
  - name: fileless-seen
    event: exec
    agents: [named]
    action: alert
    match: {fileless: true}
"""

# memexec MODE NAME SRC ARGV...: copy SRC into a memfd called NAME (MODE fexecve, execveat,
# procfd), into the file NAME then deleted (deleted), or into an O_TMPFILE file in the
# directory NAME (tmpfile), and execute it with ARGV. Exit 111: set-up failed; 112: the
# exec itself failed.
MEMEXEC_C = r"""
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
extern char **environ;

static void copy(int from, int to)
{
    char buf[65536];
    ssize_t n;
    while ((n = read(from, buf, sizeof buf)) > 0)
        if (write(to, buf, n) != n) { perror("write"); exit(111); }
    if (n < 0) { perror("read"); exit(111); }
}

int main(int argc, char **argv)
{
    if (argc < 5) { fprintf(stderr, "usage: memexec MODE NAME SRC ARGV...\n"); return 111; }
    const char *mode = argv[1], *name = argv[2];
    char **args = argv + 4;
    char path[64];
    int in = open(argv[3], O_RDONLY);
    if (in < 0) { perror(argv[3]); return 111; }
    if (!strcmp(mode, "deleted") || !strcmp(mode, "tmpfile")) {
        int tmp = !strcmp(mode, "tmpfile");
        int w = tmp ? open(name, O_TMPFILE | O_RDWR, 0755)
                    : open(name, O_CREAT | O_EXCL | O_WRONLY, 0755);
        if (w < 0) { perror(name); return 111; }
        copy(in, w);
        snprintf(path, sizeof path, "/proc/self/fd/%d", w);
        int fd = open(tmp ? path : name, O_RDONLY | O_CLOEXEC);
        if (fd < 0) { perror("reopen"); return 111; }
        close(w); /* no writer left: exec would fail with ETXTBSY */
        if (!tmp && unlink(name) != 0) { perror("unlink"); return 111; }
        fexecve(fd, args, environ);
        perror("fexecve");
        return 112;
    }
    int fd = memfd_create(name, 0);
    if (fd < 0) { perror("memfd_create"); return 111; }
    copy(in, fd);
    if (!strcmp(mode, "fexecve")) {
        fexecve(fd, args, environ);
    } else if (!strcmp(mode, "execveat")) {
        syscall(SYS_execveat, fd, "", args, environ, AT_EMPTY_PATH);
    } else if (!strcmp(mode, "procfd")) {
        snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
        execve(path, args, environ);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 111;
    }
    perror(mode);
    return 112;
}
"""

MEMFD_MODES = ("fexecve", "execveat", "procfd")


@pytest.fixture(scope="module")
def fl() -> Iterator[Running]:
    yield from running_policy(load_policy_text(POLICY, "<fileless-tests>"), SOCK)


@pytest.fixture(scope="module")
def memexec() -> Iterator[Path]:
    """The compiled helper, in a directory the unprivileged agent user can reach."""
    top = Path(tempfile.mkdtemp(prefix="aw-fileless-", dir="/tmp"))
    top.chmod(0o755)
    (top / "memexec.c").write_text(MEMEXEC_C)
    subprocess.run(["cc", "-O1", "-o", str(top / "memexec"), str(top / "memexec.c")],
                   check=True, timeout=60)
    yield top / "memexec"
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def work() -> Iterator[Path]:
    """A directory the agent user may write in (markers, deleted and O_TMPFILE files)."""
    path = Path(tempfile.mkdtemp(prefix="aw-fileless-work-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_agent(argv: list[str], agent: str) -> subprocess.Popen[bytes]:
    return agent_exec([*AS_AGENT, *argv], agent=agent, socket=SOCK)


def killed(p: subprocess.Popen[bytes]) -> bool:
    return wait_exit(p, 15) == -signal.SIGKILL


def ran_to_the_end(argv: list[str], marker: Path) -> None:
    """argv run by a process that is not an agent: it completes and leaves its marker."""
    assert subprocess.run(argv, timeout=20).returncode == 0
    assert marker.exists(), "the non-agent copy never ran"


def exec_event(r: Running, pid: int, flag: bool) -> ExecEvent:
    """The last exec of pid the monitor saw whose fileless flag is `flag`."""
    ev, _ = r.log.wait_for(lambda e, _a: isinstance(e, ExecEvent) and e.h.pid == pid
                           and bool(e.flags & ExecFlag.FILELESS) == flag)
    assert isinstance(ev, ExecEvent)
    return ev


@pytest.mark.parametrize("mode", MEMFD_MODES)
@pytest.mark.parametrize("name,agent,rule", [
    ("xmrig-test", "named", "no-miners"),  # named like a miner: the name rule
    ("notes-helper", "strict", "no-fileless"),  # a benign name: the fileless rule
])
def test_memfd_is_killed_before_its_first_instruction(
        fl: Running, memexec: Path, work: Path, mode: str, name: str, agent: str,
        rule: str) -> None:
    marker = work / "ran"
    argv = [str(memexec), mode, name, TOUCH, "touch", str(marker)]
    p = as_agent(argv, agent)
    assert killed(p)
    assert not marker.exists(), f"the memfd ({mode}) ran its code"
    v = fl.wait_verdict(rule=rule, pid=p.pid)
    assert v["outcome"] == "killed in the kernel" and v["agent"] == agent
    assert name in str(v["reason"])  # the file's own name, whatever comm says ("3")
    assert str(v["reason"]).startswith("fileless exec" if rule == "no-fileless" else "exec")
    ran_to_the_end(argv, marker)


def test_a_fileless_rule_leaves_programs_on_disk_alone(fl: Running, work: Path) -> None:
    marker = work / "ran"
    p = as_agent([TOUCH, str(marker)], "strict")
    assert wait_exit(p) == 0 and marker.exists()
    assert not exec_event(fl, p.pid, False).flags & ExecFlag.FILELESS


@pytest.mark.parametrize("mode", ["deleted", "tmpfile"])
def test_deleted_and_tmpfile_executables_are_fileless(
        fl: Running, memexec: Path, work: Path, mode: str) -> None:
    marker = work / "ran"
    where = str(work / "payload") if mode == "deleted" else str(work)
    argv = [str(memexec), mode, where, TOUCH, "touch", str(marker)]
    # an alert-only rule: it runs, and the exec is flagged and judged fileless
    p = as_agent(argv, "named")
    assert wait_exit(p) == 0 and marker.exists()
    exec_event(fl, p.pid, True)
    v = fl.wait_verdict(rule="fileless-seen", pid=p.pid)
    assert v["outcome"] == "alert"
    # a kill rule: killed in the kernel before it runs
    marker.unlink()
    p = as_agent(argv, "strict")
    assert killed(p)
    assert not marker.exists(), f"the {mode} executable ran its code"
    assert fl.wait_verdict(rule="no-fileless", pid=p.pid)["outcome"] == "killed in the kernel"
    ran_to_the_end(argv, marker)


def test_symlink_named_like_a_miner_is_killed_at_exec(fl: Running, work: Path) -> None:
    link = work / "xmrig"
    link.symlink_to("/bin/sleep")
    p = as_agent([str(link), "5"], "named")
    assert killed(p)
    assert fl.wait_verdict(rule="no-miners", pid=p.pid)["outcome"] == "killed in the kernel"
    plain = subprocess.run([str(link), "0"], timeout=10)  # not an agent: untouched
    assert plain.returncode == 0


@pytest.mark.parametrize("how", ["symlink", "hardlink-then-symlink"])
def test_miner_file_run_through_an_innocent_name_is_killed(
        fl: Running, work: Path, how: str) -> None:
    """comm is the name exec was given ("helper"); the file exec opened is named xmrig."""
    marker = work / "ran"
    miner = work / "xmrig"
    shutil.copy(TOUCH, miner)
    miner.chmod(0o755)
    target = miner
    if how == "hardlink-then-symlink":
        target = work / "xmrig-test"
        os.link(miner, target)
        miner.unlink()
    (work / "helper").symlink_to(target)
    argv = [str(work / "helper"), str(marker)]
    p = as_agent(argv, "named")
    assert killed(p)
    assert not marker.exists(), "the miner ran its code"
    v = fl.wait_verdict(rule="no-miners", pid=p.pid)
    assert v["outcome"] == "killed in the kernel" and target.name in str(v["reason"])
    ran_to_the_end(argv, marker)


def test_agents_ordinary_execs_are_not_fileless(fl: Running, work: Path) -> None:
    p = as_agent(["/bin/sh", "-c", f"{TOUCH} {work}/a && ls {work} >/dev/null"], "named")
    assert wait_exit(p) == 0
    session = exec_event(fl, p.pid, False).h.session
    time.sleep(0.3)
    flagged = [e for e, _ in fl.log.snapshot() if isinstance(e, ExecEvent)
               and e.h.session == session and e.flags & ExecFlag.FILELESS]
    assert not flagged and not fl.verdicts(rule="fileless-seen", session=session)


def test_default_policy_alerts_on_an_agents_memfd_and_kills_a_memfd_miner(
        memexec: Path, work: Path) -> None:
    gen = running_policy(default_policy(), DEFAULT_SOCK)
    r = next(gen)
    try:
        marker = work / "ran"
        argv = [str(memexec), "execveat", "notes", TOUCH, "touch", str(marker)]
        p = agent_exec([*AS_AGENT, *argv], agent="claude-code", socket=DEFAULT_SOCK)
        assert wait_exit(p) == 0 and marker.exists()  # runc does this: alerted, not killed
        assert r.wait_verdict(rule="fileless-exec", pid=p.pid)["outcome"] == "alert"
        marker.unlink()
        argv[2] = "xmrig"
        p = agent_exec([*AS_AGENT, *argv], agent="claude-code", socket=DEFAULT_SOCK)
        assert killed(p) and not marker.exists()
        assert r.wait_verdict(rule="no-miners", pid=p.pid)["outcome"] == "killed in the kernel"
    finally:
        gen.close()
