"""Unit tests for monitor.sessions.completion: a cut argv is completed from /proc only when /proc
shows the same bytes continued, and is otherwise judged as cut, saying why."""

from __future__ import annotations

from monitor.model import cmdline
from monitor.model.events import ARGS_SIZE, ExecEvent, ExecFlag
from monitor.sessions import completion
from monitor.sessions.procfs import ProcInfo
from tests.support.events import exec_event

CUT = ExecFlag.ARGV_FROM_MM | ExecFlag.ARGV_TRUNC_LEN


def exec_ev(argv: tuple[str, ...], flags: int = CUT, filename: str = "/usr/bin/ssh"
            ) -> ExecEvent:
    return exec_event(300, 1, argv, exe=filename, comm="ssh", ppid=1, flags=flags, session=7)


def proc(raw: bytes, *, exe: str = "/usr/bin/ssh", cut: bool = False) -> ProcInfo:
    argv = cmdline.split(raw)
    return ProcInfo(300, 1, "ssh", exe, argv if argv is not None else cmdline.clip_block(raw),
                    1000, "/", 5, False, cmdline=raw, cmdline_cut=cut,
                    argv_clipped=argv is None)


def kernel_cut(raw: bytes) -> tuple[str, ...]:
    """The argv the decoder makes of the probes' copy: the first ARGS_SIZE bytes."""
    kept = raw[:ARGS_SIZE]
    return tuple(cmdline.decode(p) for p in kept.split(b"\0"))


SSH_R = b"ssh\0-o\0SendEnv=X\xff" + b"A" * 3000 + b"\0-NR\0009000:localhost:22\0attacker\0"


def test_a_cut_argv_with_an_invalid_byte_is_completed() -> None:
    ev, why = completion.complete(exec_ev(kernel_cut(SSH_R)), proc(SSH_R))
    assert why is None
    assert ev.argv[-2:] == ("9000:localhost:22", "attacker") and ev.line is None
    assert ev.flags & ExecFlag.ARGV_COMPLETED and not ev.argv_truncated


def test_a_cut_inside_a_character_is_completed() -> None:
    before = b"ssh\0-o\0SendEnv="
    raw = before + b"A" * (ARGS_SIZE - 1 - len(before)) + "é".encode() * 40 + b"\0-R\0x\0h\0"
    cut = kernel_cut(raw)
    assert cut[-1].endswith("\udcc3")  # the probes kept half of a character
    ev, why = completion.complete(exec_ev(cut), proc(raw))
    assert why is None and ev.argv[-3:] == ("-R", "x", "h")


def test_a_command_line_of_too_many_arguments_is_judged_on_its_whole_line() -> None:
    raw = b"ssh\0" + b"-v\0" * 600_000 + b"-R\0x\0h\0"
    ev, why = completion.complete(exec_ev(kernel_cut(raw)), proc(raw))
    assert why is None and ev.flags & ExecFlag.ARGV_CLIPPED and ev.argv_truncated
    assert ev.line is not None and ev.line.endswith("-v -R x h")


def test_another_command_line_in_proc_is_not_taken_for_the_cut_one() -> None:
    ev0 = exec_ev(kernel_cut(SSH_R))
    ev, why = completion.complete(ev0, proc(b"sleep\x005\0"))
    assert why == completion.CHANGED
    assert ev.argv == ev0.argv and ev.flags & ExecFlag.ARGV_UNCONFIRMED and ev.argv_truncated


def test_a_process_gone_before_the_read_is_judged_as_cut_and_says_so() -> None:
    ev0 = exec_ev(kernel_cut(SSH_R))
    ev, why = completion.complete(ev0, None)
    assert why == completion.GONE and ev.argv == ev0.argv and ev.argv_truncated


def test_a_command_line_longer_than_the_read_limit_is_unconfirmed() -> None:
    raw = SSH_R + b"B" * 100
    ev, why = completion.complete(exec_ev(kernel_cut(SSH_R)), proc(raw, cut=True))
    assert why == completion.TOO_LONG
    assert ev.flags & ExecFlag.ARGV_COMPLETED and ev.flags & ExecFlag.ARGV_UNCONFIRMED
    assert ev.argv[-2:] == ("attacker", "B" * 100)  # judged on what was read: more than cut


def test_an_argv_that_fits_is_left_alone() -> None:
    ev0 = exec_ev(("ssh", "-R", "x", "h"), flags=ExecFlag.ARGV_FROM_MM)
    assert not completion.needs_proc(ev0)
    assert completion.complete(ev0, proc(b"other\0")) == (ev0, None)


def test_missing_argv_and_a_descriptor_name_come_from_proc() -> None:
    ev0 = exec_ev((), flags=ExecFlag.ARGV_MISSING, filename="/dev/fd/3")
    assert completion.needs_proc(ev0)
    ev, why = completion.complete(ev0, proc(b"ssh\0-R\0x\0h\0", exe="/usr/bin/ssh"))
    assert why is None and ev.argv == ("ssh", "-R", "x", "h") and ev.filename == "/usr/bin/ssh"


def test_what_is_kept_of_a_completed_exec_is_bounded() -> None:
    raw = SSH_R.replace(b"A" * 3000, b"A" * 100_000)
    ev, _ = completion.complete(exec_ev(kernel_cut(raw)), proc(raw))
    assert len(ev.argv[2]) > 100_000  # judged whole...
    kept = completion.kept(ev)  # ...kept clipped
    assert sum(len(a) + 1 for a in kept.argv) <= cmdline.KEEP_CHARS + 100
    assert kept.argv[-2:] == ("9000:localhost:22", "attacker") and kept.line is None
    assert kept.argv_truncated
    small = exec_ev(("ls",), flags=0)
    assert completion.kept(small) is small
