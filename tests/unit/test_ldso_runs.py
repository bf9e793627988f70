"""An agent's program run through the dynamic loader is judged as that program:
monitor.sessions.loader.Loaders over a fixture /proc (exe and cwd links to real files: the
real loader, renamed copies of it, programs), and the daemon's path from an exec record to
a verdict that names the program and the loader it ran through.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

from monitor.model import ldso
from monitor.model.events import ExecEvent
from monitor.model.records import ExecRecord
from monitor.observe import output
from monitor.policy.load import load_policy_text
from monitor.policy.replay import replay
from monitor.service.daemon import Monitor
from monitor.sessions.loader import Loaders
from monitor.sessions.procfs import ProcFS
from tests.support.events import S1, exec_event
from tests.support.kernel import FakeProbes
from tests.support.log import Log
from tests.support.monitor import B, config, make_proc

LD = "/lib64/ld-linux-x86-64.so.2"
PID = 4242

pytestmark = pytest.mark.skipif(not os.path.exists(LD), reason="no glibc loader")


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """tmp/proc (a /proc with one process PID, cwd tmp/work), tmp/work/xmrig (a copy of
    sleep), tmp/work/helper (a copy of the loader), tmp/sys (a system library folder)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy("/bin/sleep", work / "xmrig")
    shutil.copy(LD, work / "helper")
    (tmp_path / "sys").mkdir()
    (tmp_path / "proc" / str(PID)).mkdir(parents=True)
    os.symlink(work, tmp_path / "proc" / str(PID) / "cwd")
    return tmp_path


def running(world: Path, exe: str | Path) -> Loaders:
    os.symlink(exe, world / "proc" / str(PID) / "exe")
    return Loaders(world / "proc", system_dirs=[str(world / "sys")])


def exec_of(filename: str, *argv: str) -> ExecEvent:
    return exec_event(PID, 1, tuple(argv), exe=filename, comm="ld-linux-x86-64")


def test_a_program_run_by_the_loader_becomes_the_exec(world: Path) -> None:
    ev = running(world, LD).unwrap(exec_of(LD, LD, "--argv0", "kworker", "./xmrig", "9"))
    assert ev.filename == f"{world}/work/xmrig" and ev.argv == ("kworker", "9")
    assert ev.loader == LD
    assert (LD, (LD, "--argv0", "kworker", "./xmrig", "9")) in ev.loader_others


def test_a_renamed_copy_of_the_loader_is_a_loader(world: Path) -> None:
    helper = world / "work" / "helper"
    ev = running(world, helper).unwrap(exec_of(str(helper), "helper", "xmrig/../xmrig"))
    assert ev.loader == str(helper)
    assert ev.filename == f"{world}/work/xmrig/../xmrig"


def test_a_program_is_untouched(world: Path) -> None:
    ev = exec_of("/bin/true", "/bin/true", "--argv0", "x", "./xmrig")
    assert running(world, "/bin/true").unwrap(ev) is ev


def test_a_program_named_like_the_loader_is_not_one(world: Path) -> None:
    fake = world / "work" / "ld-linux-x86-64.so.2"
    shutil.copy("/bin/true", fake)
    ev = exec_of(str(fake), str(fake), "./xmrig")
    assert running(world, fake).unwrap(ev) is ev


def test_loaders_running_loaders_are_unwrapped_and_all_judged(world: Path) -> None:
    helper = str(world / "work" / "helper")
    ev = running(world, LD).unwrap(exec_of(LD, LD, helper, "--argv0", "x", helper,
                                           "./xmrig", "1"))
    assert ev.filename == f"{world}/work/xmrig" and ev.argv == ("./xmrig", "1")
    assert [p for p, _ in ev.loader_others[:2]] == [helper, helper]


def test_loaders_nested_past_the_bound_are_judged_conservatively(world: Path) -> None:
    helper = str(world / "work" / "helper")
    ev = running(world, LD).unwrap(exec_of(LD, LD, *[helper] * 8, "./xmrig"))
    judged = [ev.filename, *(p for p, _ in ev.loader_others)]
    assert f"{world}/work/xmrig" in judged


def test_an_unknown_option_judges_every_possible_program(world: Path) -> None:
    ev = running(world, LD).unwrap(exec_of(LD, LD, "--frobnicate", "v", "./xmrig", "1"))
    judged = {p for p, _ in ev.loader_others} | {ev.filename}
    assert {f"{world}/work/v", f"{world}/work/xmrig"} <= judged and ev.loader == LD


def test_a_bare_name_is_looked_up_where_glibc_looks(world: Path) -> None:
    shutil.copy("/bin/true", world / "sys" / "tool")
    ev = running(world, LD).unwrap(exec_of(LD, LD, "tool"))
    assert ev.filename == f"{world}/sys/tool"
    ev = running_again(world).unwrap(exec_of(LD, LD, "xmrig"))  # not in the working dir
    assert ev.filename == "xmrig"


def running_again(world: Path) -> Loaders:
    return Loaders(world / "proc", system_dirs=[str(world / "sys")])


@pytest.mark.parametrize("spelling", ["/proc/self/fd/3", "/dev/fd/3", f"/proc/{PID}/fd/3",
                                      "/proc/thread-self/fd/3"])
def test_a_program_named_by_a_descriptor_is_named_by_its_file(world: Path,
                                                              spelling: str) -> None:
    (world / "proc" / str(PID) / "fd").mkdir()
    os.symlink(world / "work" / "xmrig", world / "proc" / str(PID) / "fd" / "3")
    ev = running(world, LD).unwrap(exec_of(LD, LD, spelling))
    assert ev.filename == f"{world}/work/xmrig"


def test_a_loader_that_has_exec_d_again_is_judged_by_the_file_at_its_path(world: Path) -> None:
    ld = world / "work" / "ld-linux-x86-64.so.2"
    shutil.copy(LD, ld)  # what ran: a loader; /proc/PID/exe is /bin/true by now
    ev = running(world, "/bin/true").unwrap(exec_of(str(ld), str(ld), "./xmrig"))
    assert ev.filename == f"{world}/work/xmrig" and ev.loader == str(ld)
    # a program merely named like a loader (and still running) is itself
    shutil.copy("/bin/true", ld)
    (world / "proc" / str(PID) / "exe").unlink()
    ev = running(world, ld).unwrap(exec_of(str(ld), str(ld), "./xmrig"))
    assert ev.loader is None


def test_a_program_named_through_a_symlink_is_judged_by_its_files_name_too(world: Path) -> None:
    os.symlink("xmrig", world / "work" / "build")
    ev = running(world, LD).unwrap(exec_of(LD, LD, "./build"))
    assert ev.filename == f"{world}/work/build"
    assert (f"{world}/work/xmrig", ("./build",)) in ev.loader_others


def test_a_gone_process_named_like_a_loader_is_judged_by_its_name(world: Path) -> None:
    loaders = Loaders(world / "proc")
    ev = exec_event(999999, 1, (LD, "/tmp/xmrig"), exe=LD)
    out = loaders.unwrap(ev)
    assert out.filename == "/tmp/xmrig" and out.loader == LD


def test_the_loader_with_nothing_to_run_is_judged_as_itself(world: Path) -> None:
    ev = exec_of(LD, LD, "--help")
    assert running(world, LD).unwrap(ev) is ev


def test_fifos_and_devices_are_never_read_as_programs(world: Path) -> None:
    os.mkfifo(world / "work" / "fifo")
    loaders = running(world, LD)
    ev = loaders.unwrap(exec_of(LD, LD, "./fifo", "/dev/zero"))  # would hang if read
    assert ev.filename == f"{world}/work/fifo"
    assert loaders.kind_of(str(world / "work" / "fifo")) is None
    assert loaders.kind_of("/dev/zero") is None
    sparse = world / "work" / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(100 << 30)  # 100 GiB of nothing
    assert loaders.kind_of(str(sparse)) is None


def test_the_kind_is_cached_by_file_identity(world: Path) -> None:
    loaders = running(world, LD)
    helper = world / "work" / "helper"
    assert loaders.kind_of(str(helper)) == ldso.GLIBC
    helper.write_bytes(Path("/bin/true").read_bytes())  # changed: read again
    assert loaders.kind_of(str(helper)) is None


# --- the daemon: from the exec record to the verdict -----------------------------------------

POLICY = textwrap.dedent("""\
    mode: monitor
    rules:
      - name: no-miners
        event: exec
        action: kill
        match:
          name: [xmrig]
      - name: no-reverse-ssh
        event: exec
        action: kill
        match:
          ssh: [remote_forward]
      - name: no-direct-loader
        event: exec
        action: alert
        match:
          argv: ["^/lib64/ld-linux-x86-64[.]so[.]2 --preload"]
    """)


def monitor_for(world: Path, exe: str | Path) -> tuple[Monitor, Log]:
    os.symlink(exe, world / "proc" / str(PID) / "exe")
    log = Log()
    mon = Monitor(config(), load_policy_text(POLICY, "p.yaml"), probes=FakeProbes(),
                  procfs=ProcFS(world / "proc"), log=log)
    return mon, log


def verdicts(log: Log) -> dict[str, dict[str, object]]:
    return {str(f["rule"]): f for f in log.find("verdict")}


@pytest.mark.parametrize("spelling", [
    ("./xmrig", "9"), ("--argv0", "sleep", "./xmrig", "9"),
    ("--inhibit-cache", "--library-path", "/x", "./xmrig"),
    ("--frobnicate", "./xmrig")])
def test_a_miner_through_the_loader_is_judged_as_the_miner(world: Path,
                                                           spelling: tuple[str, ...]) -> None:
    mon, log = monitor_for(world, LD)
    mon.handle(exec_of(LD, LD, *spelling))
    v = verdicts(log)["no-miners"]
    assert v["exe"] == f"{world}/work/xmrig" and v["loader"] == LD
    assert f"via {LD}" in str(v["reason"]) and v["session"] == S1


def test_a_miner_through_a_renamed_loader_is_judged_as_the_miner(world: Path) -> None:
    helper = world / "work" / "helper"
    mon, log = monitor_for(world, helper)
    mon.handle(exec_of(str(helper), "helper", "--argv0", "python3", str(world / "work/xmrig")))
    assert verdicts(log)["no-miners"]["argv"] == ["python3"]


def test_ssh_through_the_loader_is_judged_on_the_argv_ssh_sees(world: Path) -> None:
    mon, log = monitor_for(world, LD)
    mon.handle(exec_of(LD, LD, "/usr/bin/ssh", "-R", "9000:localhost:22", "host"))
    v = verdicts(log)["no-reverse-ssh"]
    assert v["argv"] == ["/usr/bin/ssh", "-R", "9000:localhost:22", "host"]
    assert "remote_forward" in str(v["reason"])


def test_a_rule_on_the_loaders_own_command_line_still_holds(world: Path) -> None:
    mon, log = monitor_for(world, LD)
    mon.handle(exec_of(LD, LD, "--preload", "/tmp/x.so", "/bin/true"))
    assert set(verdicts(log)) == {"no-direct-loader"}


def test_a_benign_program_through_the_loader_is_left_alone(world: Path) -> None:
    mon, log = monitor_for(world, LD)
    mon.handle(exec_of(LD, LD, "/bin/true"))
    assert not verdicts(log)


def test_trace_shows_the_program_and_the_loader_it_ran_through(world: Path) -> None:
    ev = running(world, LD).unwrap(exec_of(LD, LD, "--argv0", "kworker", "./xmrig", "9"))
    rec = output.record(ev, "claude-code")
    assert rec["filename"] == f"{world}/work/xmrig" and rec["loader"] == LD
    assert rec["argv"] == ["kworker", "9"]
    assert output.columns_of(rec).endswith(f"xmrig 9 [via {LD}]")
    assert ExecRecord.from_json(rec).loader == LD
    plain = output.record(exec_of("/bin/true", "/bin/true"), "claude-code")
    assert "loader" not in plain  # records of other execs are as they were


def test_a_miner_found_running_through_the_loader_is_judged_as_the_miner(world: Path) -> None:
    mon, log = monitor_for(world, LD)
    proc = world / "proc"
    shutil.rmtree(proc / str(PID))
    miner = str(world / "work" / "xmrig")
    make_proc(proc, B, 1, "claude", argv=("claude",), exe="/bin/true")  # the agent
    make_proc(proc, B + 1, B, "ld-linux-x86-64", argv=(LD, "--argv0", "x", miner, "9"),
              exe=LD)
    mon.adopter.adopt_running()
    v = verdicts(log)["no-miners"]
    assert (v["pid"], v["exe"], v["loader"], v["argv"]) == (B + 1, miner, LD, ["x", "9"])


def test_a_recorded_loader_run_replays_as_the_program(world: Path) -> None:
    ev = running(world, LD).unwrap(exec_of(LD, LD, "./xmrig", "9"))
    rec = output.record(ev, "claude-code")
    [v] = replay(load_policy_text(POLICY, "p.yaml"), [rec])
    assert v.rule == "no-miners" and v.loader == LD


def test_an_executable_root_cannot_read_is_judged_as_a_possible_loader(world: Path) -> None:
    loaders = running(world, world / "proc" / str(PID) / "exe")  # a link to itself: ELOOP
    ev = loaders.unwrap(exec_of("/opt/tool", "/opt/tool", "./xmrig"))
    assert ev.filename == f"{world}/work/xmrig"
    assert ev.loader_others[-1][1] == ("/opt/tool", "./xmrig")  # itself, too
