"""What the `agentwatch` commands print when the text came from an agent: `policy test`,
`trace` (columns and the monitor's log lines), `status` and error messages never hand a
terminal a control character, and never crash on bytes that were not UTF-8."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest

from monitor.cli import main as cli
from monitor.model.errors import ControlError
from monitor.model.events import ExecEvent, ExecFlag, ForkEvent, Header
from monitor.observe.output import record

CLEAR, TITLE = "\x1b[2J", "\x1b]0;owned\x07"
RAW = b"\x9b\xff".decode("utf-8", "surrogateescape")  # bytes that were not UTF-8
FORGED = "\nwould kill   fake-rule                        claude         pid 1: all clear"
HOSTILE_EXE = f"/tmp/{CLEAR}{TITLE}{RAW}\u202e{FORGED}/x"

POLICY = """\
mode: enforce
agents:
  - {name: claude, match: [{comm: claude}]}
rules:
  - {name: tmp-exec, event: exec, action: kill, match: {exe: ["/tmp/*"]}}
"""


# pytest's capsys writes UTF-8 strictly, as stdout on a UTF-8 terminal does: a surrogate
# (an argv byte that was not UTF-8) printed raw raises there as it would in `trace`.


def safe_lines(text: str) -> list[str]:
    """text's lines, each checked: no control (but the line ends), format or surrogate
    character, as a terminal would get them."""
    for ch in text:
        cat = unicodedata.category(ch)
        assert ch == "\n" or cat not in ("Cc", "Cf", "Cs", "Zl", "Zp"), \
            f"{ch!r} reaches the terminal in {text!r}"
    return text.splitlines()


def hostile_exec(pid: int = 4242) -> ExecEvent:
    h = Header(ts_ns=2_000_000_000, pid=pid, tid=pid, session=0x80000001, agent=0,
               uid=1000, comm=f"{CLEAR}{RAW}")
    return ExecEvent(h, old_tid=pid, ppid=1, cgroup_id=1, flags=ExecFlag(0),
                     filename=HOSTILE_EXE, argv=("x", TITLE, RAW))


def test_policy_test_prints_hostile_paths_escaped(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    recording = tmp_path / "events.jsonl"
    h = Header(ts_ns=1, pid=4242, tid=4242, session=0x80000001, agent=0, uid=1000,
               comm="claude")
    recording.write_text("\n".join(json.dumps(record(ev, "claude")) for ev in (
        ForkEvent(h, child_pid=4242), hostile_exec())) + "\n")
    assert cli.main(["policy", "test", str(policy), "--events", str(recording)]) == 0
    lines = safe_lines(capsys.readouterr().out)
    assert len(lines) == 2, "one line per verdict and the summary: nothing forged"
    assert lines[0].startswith("would kill   tmp-exec")
    assert "\\x1b[2J\\x1b]0;owned\\x07\\x9b\\xff\\u202e\\nwould kill" in lines[0]


def test_trace_columns_of_a_streamed_record_with_raw_bytes_print(
        capsys: pytest.CaptureFixture[str]) -> None:
    """`trace` streaming from a monitor: the record came as JSON, with argv bytes that were
    not UTF-8 as lone surrogates; on a UTF-8 terminal printing them used to raise."""
    item = json.loads(json.dumps(record(hostile_exec(), "claude")))
    cli._print_record(item, False, None)
    lines = safe_lines(capsys.readouterr().out)
    assert len(lines) == 1
    assert "\\x1b[2J\\x9b\\xff" in lines[0]  # the comm, visible


def test_trace_json_of_a_streamed_record_stays_json(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    item = json.loads(json.dumps(record(hostile_exec(), "claude")))
    rec = tmp_path / "rec.jsonl"
    with open(rec, "w", encoding="utf-8") as f:
        cli._print_record(item, True, f)
    out = capsys.readouterr().out  # ensure_ascii: every control escaped
    assert len(safe_lines(out)) == 1
    assert json.loads(out)["filename"] == HOSTILE_EXE
    assert json.loads(rec.read_text())["argv"][2] == RAW


def test_trace_log_lines_escape_agent_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """`trace` without a monitor prints its own monitor's log lines (verdicts: exe, argv,
    reason) on stderr."""
    cli._quiet_log("verdict", rule="tmp-exec", exe=HOSTILE_EXE, argv=["x", TITLE, RAW],
                   reason=f"executable {HOSTILE_EXE} matches /tmp/*")
    err = capsys.readouterr().err
    lines = safe_lines(err)
    assert len(lines) == 1 and lines[0].startswith("# verdict rule=tmp-exec exe=/tmp/\\x1b[2J")


def test_status_prints_hostile_strings_as_json_escapes(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    reply = {"ok": True, "sessions": [{"agent": "claude", "root_comm": f"{CLEAR}{RAW}"}]}
    monkeypatch.setattr(cli.client, "request", lambda path, req, **kw: dict(reply))
    assert cli.main(["status", "--socket", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    safe_lines(out)
    assert json.loads(out)["sessions"][0]["root_comm"] == f"{CLEAR}{RAW}"


def test_an_error_that_echoes_agent_text_is_escaped(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(path: str, req: object, **kw: object) -> dict[str, object]:
        raise ControlError(f"the monitor refused: process {CLEAR}{RAW}{FORGED} exited")

    monkeypatch.setattr(cli.client, "request", refuse)
    assert cli.main(["status", "--socket", "/nonexistent"]) == 4
    lines = safe_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "\\x1b[2J\\x9b\\xff\\nwould kill" in lines[0]


def test_a_config_error_keeps_one_line_per_problem_each_escaped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recording = tmp_path / "events.jsonl"
    recording.write_text(json.dumps({"event": f"exec{CLEAR}\nforged", "pid": 1}) + "\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    assert cli.main(["policy", "test", str(policy), "--events", str(recording)]) == 2
    lines = safe_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith(f"agentwatch: {recording}:1: unknown event")
