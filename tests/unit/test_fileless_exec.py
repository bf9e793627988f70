"""Fileless execs and executables' own names, without the kernel: the BTF offsets the probes
need, the flag and the file name as decoded, the `fileless:` match key (validation, engine,
kernel tables: a `fileless: true` rule alone is enforced in the kernel, and the kernel's
answer equals the engine's), replay and the text output."""

from __future__ import annotations

import ctypes as ct
import textwrap
from pathlib import Path

import pytest

from monitor.kernel.abi import CExecEvent, CVerdictEvent, decode
from monitor.kernel.btf import BTF, VMLINUX, task_offsets
from monitor.model.cmdline import file_name
from monitor.model.errors import ConfigError
from monitor.model.events import (
    EventType,
    ExecEvent,
    ExecFlag,
    Header,
    KAction,
    RuleMask,
    VerdictEvent,
    VerdictKind,
)
from monitor.model.records import KernelVerdictRecord
from monitor.observe.output import columns_of, record
from monitor.policy.engine import evaluate_exec, match_exec
from monitor.policy.kernel_tables import compile_kernel, kernel_eligible, kernel_exec_hits
from monitor.policy.load import default_policy, load_policy_text
from monitor.policy.replay import replay
from monitor.policy.types import Policy
from monitor.sessions.completion import complete, needs_proc
from monitor.sessions.procfs import ProcInfo

HEAD = """\
mode: enforce
agents:
  - {name: bot, match: [{comm: bot}]}
  - {name: ci, match: [{comm: ci}]}
rules:
"""


def policy(rules: str) -> Policy:
    return load_policy_text(HEAD + textwrap.dedent(rules), "test.yaml")


# --- BTF -------------------------------------------------------------------------------------


@pytest.mark.skipif(not VMLINUX.exists(), reason="this kernel has no BTF")
def test_exe_file_offsets_are_found_in_this_kernels_btf() -> None:
    offsets = task_offsets()
    assert offsets is not None
    btf = BTF(VMLINUX.read_bytes())
    assert offsets["AW_MM_EXE_FILE_OFF"] == btf.offset("mm_struct", "exe_file")
    assert offsets["AW_FILE_INODE_OFF"] == btf.offset("file", "f_inode")
    # i_nlink lives in an anonymous union with __i_nlink: found through it
    assert offsets["AW_INODE_NLINK_OFF"] == btf.offset("inode", "__i_nlink")
    f_path, dentry = btf.offset("file", "f_path"), btf.offset("path", "dentry")
    d_name, name = btf.offset("dentry", "d_name"), btf.offset("qstr", "name")
    assert f_path is not None and dentry is not None and d_name is not None and name is not None
    assert offsets["AW_FILE_DENTRY_OFF"] == f_path + dentry
    assert offsets["AW_DENTRY_NAME_PTR_OFF"] == d_name + name


def test_missing_btf_gives_no_offsets(tmp_path: Path) -> None:
    assert task_offsets(tmp_path / "absent") is None
    (tmp_path / "junk").write_bytes(b"\0" * 64)
    assert task_offsets(tmp_path / "junk") is None


# --- decoding --------------------------------------------------------------------------------


def test_the_fileless_flag_is_a_probe_bit_and_decodes() -> None:
    assert ExecFlag.FILELESS == 0x100  # a probe bit: below the userspace ones (0x10000..)
    e = CExecEvent()
    e.h.type = EventType.EXEC
    e.h.pid = e.h.tid = 9
    e.h.session = 1
    e.flags = ExecFlag.ARGV_FROM_MM | ExecFlag.FILELESS
    e.filename = b"/dev/fd/3"
    ev = decode(bytes(e)[:CExecEvent.args.offset])
    assert isinstance(ev, ExecEvent) and ev.is_fileless
    e.flags = ExecFlag.ARGV_FROM_MM
    ev = decode(bytes(e)[:CExecEvent.args.offset])
    assert isinstance(ev, ExecEvent) and not ev.is_fileless and not ev.fileless


def test_an_exec_verdict_names_the_executable_file() -> None:
    v = CVerdictEvent()
    v.h.type = EventType.VERDICT
    v.h.pid = v.h.tid = 9
    v.h.comm = b"3"
    v.kind = VerdictKind.EXEC
    v.mask = 1
    v.action = KAction.KILL
    v.enforced = 1
    ct.memmove(v.addr, b"xmrig-test\0", 11)
    ev = decode(bytes(v))
    assert isinstance(ev, VerdictEvent) and ev.file == "xmrig-test" and ev.address == ""
    rec = record(ev, "bot")  # trace --json and --record carry it
    assert rec["file"] == "xmrig-test" and rec["address"] is None
    assert KernelVerdictRecord.from_json(rec).file == "xmrig-test"


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("value,shown", [("yes please", "str"), ("1", "int"), ("[true]", "list")])
def test_fileless_must_be_true_or_false(value: str, shown: str) -> None:
    text = f"  - name: a\n    event: exec\n    action: kill\n    match:\n      fileless: {value}\n"
    with pytest.raises(ConfigError) as info:
        policy(text)
    assert info.value.exit_code == 2
    (loc, reason), = info.value.problems
    assert (loc.file, loc.line, loc.key) == ("test.yaml", 10, "rules[0].match.fileless")
    assert reason == f"expected true or false, got {shown}"


def test_fileless_is_an_exec_key_only() -> None:
    with pytest.raises(ConfigError) as info:
        policy("  - {name: a, event: connect, action: deny, match: {fileless: true}}\n")
    (loc, reason), = info.value.problems
    assert loc.line == 6 and "unknown key 'fileless'" in reason


# --- engine ----------------------------------------------------------------------------------


def test_a_memfd_is_named_by_its_name() -> None:
    assert file_name("/memfd:xmrig-test") == "xmrig-test"
    assert file_name("/usr/bin/xmrig") == "xmrig"
    assert file_name("/tmp/memfd:x") == "memfd:x"  # a file on disk, named so
    assert file_name("/memfd:runc_cloned:/proc/self/exe") == "runc_cloned:/proc/self/exe"
    p = policy("  - {name: m, event: exec, action: kill, match: {name: [xmrig-test]}}\n")
    assert match_exec(p.rules[0], "bot", "/memfd:xmrig-test", "memfd:xmrig-tes", ["x"])
    # the file's name cut as a comm, as the kernel looks it up
    p = policy("  - {name: m, event: exec, action: kill, match: {name: [averylongminer-x]}}\n")
    assert match_exec(p.rules[0], "bot", "/opt/averylongminer-y", "helper", ["x"])


def test_fileless_rules_in_the_engine() -> None:
    p = policy("""\
        - {name: any-fileless, event: exec, action: kill, match: {fileless: true}}
        - {name: on-disk, event: exec, action: alert, match: {fileless: false}}
        - {name: fileless-miner, event: exec, action: kill,
           match: {fileless: true, name: [xmrig]}}
        """)
    hits = evaluate_exec(p, agent="bot", session=1, pid=2, exe="/memfd:notes", comm="3",
                         argv=["notes"], fileless=True)
    assert [v.rule for v in hits] == ["any-fileless"]
    assert hits[0].reason == "fileless executable (a memfd, a deleted or O_TMPFILE file)"
    hits = evaluate_exec(p, agent="bot", session=1, pid=2, exe="/usr/bin/xmrig",
                         comm="xmrig", argv=["xmrig"])
    assert [v.rule for v in hits] == ["on-disk"]
    hits = evaluate_exec(p, agent="bot", session=1, pid=2, exe="/memfd:xmrig", comm="3",
                         argv=["x"], fileless=True)
    assert [v.rule for v in hits] == ["any-fileless", "fileless-miner"]
    assert hits[1].reason == "fileless executable (a memfd, a deleted or O_TMPFILE file); " \
        "runs xmrig"


# --- kernel tables ---------------------------------------------------------------------------


RULES = """\
- {name: f-kill, event: exec, action: kill, agents: [bot], match: {fileless: true}}
- {name: n-kill, event: exec, action: kill-agent, match: {name: [xmrig, averylongminer-x]}}
- {name: f-alert, event: exec, action: alert, match: {fileless: true}}
- {name: f-name, event: exec, action: kill, match: {fileless: true, name: [sh]}}
- {name: f-false, event: exec, action: kill, match: {fileless: false}}
- {name: f-argv, event: exec, action: kill, match: {fileless: true, argv: [x]}}
"""


def test_a_fileless_rule_alone_is_compiled_into_the_kernel() -> None:
    p = policy(RULES)
    assert [r.name for r in p.rules if kernel_eligible(r)] == ["f-kill", "n-kill"]
    t = compile_kernel(p)
    assert t.masks[RuleMask.FILELESS] == 0b01
    assert t.masks[RuleMask.KILL] == 0b11
    assert dict(t.exec_names) == {b"xmrig": 0b10, b"averylongminer-": 0b10}
    assert t.scope("bot") == 0b11 and t.scope("ci") == 0b10
    maps = t.rule_maps(["bot", "ci"], 1)
    assert maps.masks.values[RuleMask.FILELESS] == 0b01
    assert maps.masks.keys[RuleMask.FILELESS] == len(RuleMask) + RuleMask.FILELESS


@pytest.mark.parametrize("agent", ["bot", "ci"])
@pytest.mark.parametrize("exe,comm,fileless", [
    ("/memfd:xmrig", "memfd:xmrig", True), ("/proc/self/fd/3", "3", True),
    ("/memfd:notes", "memfd:notes", True), ("/usr/bin/xmrig", "helper", False),
    ("/opt/averylongminer-y", "x", False), ("/bin/sleep", "xmrig", False),
    ("/tmp/notes (x)", "notes (x)", True), ("/bin/true", "true", False),
])
def test_kernel_exec_hits_equal_the_engine(agent: str, exe: str, comm: str,
                                           fileless: bool) -> None:
    p = policy(RULES)
    t = compile_kernel(p)
    # what the probes look up: the comm, and the file's own name (a memfd's without
    # "memfd:"; for /proc/self/fd/3 the kernel knows the memfd's name: "xmrig")
    file = "xmrig" if exe == "/proc/self/fd/3" else file_name(exe)
    kernel = kernel_exec_hits(t, agent, comm, file, fileless)
    engine_exe = "/memfd:xmrig" if exe == "/proc/self/fd/3" else exe
    engine = {r.name for r in t.rules
              if match_exec(r, agent, engine_exe, comm, [comm], fileless=fileless)}
    assert {r.name for i, r in enumerate(t.rules) if kernel >> i & 1} == engine


# --- replay and output -----------------------------------------------------------------------


def test_recorded_fileless_execs_replay_and_show() -> None:
    ev = ExecEvent(Header(1, 5, 5, 7, 0, 1000, "memfd:notes"), 5, 1, 0,
                   int(ExecFlag.FILELESS | ExecFlag.ARGV_FROM_MM), "/memfd:notes", ("notes",))
    rec = record(ev, "bot")
    assert "fileless" in rec["flags"] and rec["fileless"] is True
    assert "[fileless]" in columns_of(rec)
    p = policy("  - {name: f, event: exec, action: kill, match: {fileless: true}}\n")
    assert [v.rule for v in replay(p, [rec])] == ["f"]
    rec["flags"], rec["fileless"] = ["argv_from_mm"], False
    assert replay(p, [rec]) == []
    del rec["fileless"]  # a recording from before the field: the flag alone says it
    assert replay(p, [rec]) == []


# --- the default policy ----------------------------------------------------------------------


def default_exec(exe: str, comm: str, argv: list[str], fileless: bool) -> list[tuple[str, str]]:
    return [(v.rule, v.action.value) for v in evaluate_exec(
        default_policy(), agent="claude-code", session=1, pid=2, exe=exe, comm=comm,
        argv=argv, fileless=fileless)]


def test_default_policy_alerts_on_a_fileless_exec_and_kills_a_fileless_miner() -> None:
    # runc's CVE-2019-5736 re-exec from a memfd (rootless podman in an agent's tree): alert
    assert default_exec("/memfd:runc_cloned:/proc/self/exe", "memfd:runc_clon",
                        ["runc", "init"], True) == [("fileless-exec", "alert")]
    assert default_exec("/tmp/payload", "3", ["x"], True) == [("fileless-exec", "alert")]
    assert default_exec("/memfd:xmrig", "memfd:xmrig", ["xmrig"], True) == [
        ("no-miners", "kill"), ("fileless-exec", "alert")]
    assert default_exec("/usr/bin/make", "make", ["make", "-j8"], False) == []
    t = compile_kernel(default_policy())
    assert "fileless-exec" not in {r.name for r in t.rules}  # alert: userspace only
    assert t.masks[RuleMask.FILELESS] == 0


@pytest.mark.parametrize("filename", ["/dev/fd/3", "/proc/self/fd/3", "/proc/4242/exe"])
def test_an_exec_through_a_descriptor_is_named_by_proc_exe(filename: str) -> None:
    ev = ExecEvent(Header(1, 5, 5, 7, 0, 1000, "3"), 5, 1, 0, int(ExecFlag.FILELESS),
                   filename, ("x",))
    assert needs_proc(ev)
    info = ProcInfo(5, 1, "3", "/memfd:xmrig", ("x",), 1000, "/", 1, False)
    done, unconfirmed = complete(ev, info)
    assert done.filename == "/memfd:xmrig" and unconfirmed is None
    assert file_name(done.filename) == "xmrig"
