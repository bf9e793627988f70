"""Unit tests for monitor.cli.top: the model from synthetic status dicts and stream records, the
frame as an operator reads it, and run_top against a real ControlServer on a tmp socket."""

from __future__ import annotations

import io
import json
import queue
import re
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from monitor.cli.top import TopModel, _drain, _pump, render, run_top
from monitor.model.errors import ControlError
from monitor.model.outcome import Outcome
from monitor.service.control import ControlServer, Subscribers

SHA = "ab12cd34ef56" + "0" * 52


def status(sessions: list[dict[str, Any]], *, events: int = 0, lost: int = 0,
           mode: str = "enforce", verdicts: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    return {"ok": True, "probes": 9, "events": events, "decode_errors": 0,
            "policy": {"source": "/etc/agentwatch/policy.yaml", "sha256": SHA, "mode": mode,
                       "rules": 4, "kernel_rules": ["no-ssh"]},
            "verdicts": verdicts or [], "sessions": sessions,
            "counters": {"lost": lost, "kills": 0}, "agents": ["claude", "ci-bot"]}


def session(sid: int, agent: str, cpu: float, *, procs: int = 3) -> dict[str, Any]:
    return {"session": sid, "agent": agent, "root_pid": 1000 + sid, "processes": procs,
            "cpu_seconds": cpu, "execs": 7, "connects": 2}


def connect(port: int, protocol: str = "tcp", *, family: str = "ipv4",
            address: str = "10.0.0.5") -> dict[str, Any]:
    return {"ts_ns": 1, "event": "connect", "agent": "claude", "session": 1, "pid": 4242,
            "tid": 4242, "uid": 0, "comm": "curl", "family": family, "address": address,
            "port": port, "protocol": protocol}


# the outcome_label the monitor sends with each outcome text these tests use
KIND_OF = {"killed": Outcome.KILLED, "killed in the kernel": Outcome.KILLED_IN_KERNEL,
           "agent session killed (3 processes signalled)": Outcome.SESSION_KILLED,
           "would kill": Outcome.WOULD_KILL, "alert": Outcome.ALERTED,
           "refused in the kernel": Outcome.REFUSED_IN_KERNEL}


def verdict(outcome: str, *, rule: str = "no-ssh", action: str = "kill",
            mode: str = "enforce", pid: int = 4242,
            kind: Outcome | None = None) -> dict[str, Any]:
    label = (kind or KIND_OF[outcome]).label
    return {"event": "policy_verdict", "agent": "claude", "rule": rule, "action": action,
            "mode": mode, "outcome": outcome, "outcome_label": label, "pid": pid, "session": 1,
            "reason": "connect to 203.0.113.9:22 (port 22)", "exe": "/usr/bin/ssh",
            "argv": ["ssh", "host"], "destination": "203.0.113.9:22"}


def text_of(model: TopModel, *, styles: bool = False, width: int = 120) -> str:
    console = Console(record=True, width=width, file=io.StringIO(),
                      force_terminal=styles, color_system="standard" if styles else None)
    console.print(render(model, "/run/agentwatch/control.sock"))
    return console.export_text(styles=styles)


# --- the model ---------------------------------------------------------------------------


def test_cpu_rate_comes_from_two_snapshots_and_orders_sessions() -> None:
    m = TopModel()
    m.update_status(status([session(1, "claude", 1.0), session(2, "ci-bot", 5.0)]), now=10.0)
    assert [s.cpu_rate for s in m.sessions] == [None, None]  # one snapshot: no rate yet
    m.update_status(status([session(1, "claude", 3.0), session(2, "ci-bot", 5.5)]), now=12.0)
    rates = {s.agent: s.cpu_rate for s in m.sessions}
    assert rates == {"claude": pytest.approx(1.0), "ci-bot": pytest.approx(0.25)}
    assert [s.agent for s in m.sessions] == ["claude", "ci-bot"]  # busiest first


def test_a_new_session_has_no_rate_and_a_gone_one_disappears() -> None:
    m = TopModel()
    m.update_status(status([session(1, "claude", 1.0)]), now=0.0)
    m.update_status(status([session(2, "ci-bot", 4.0)]), now=1.0)
    assert [(s.session, s.cpu_rate) for s in m.sessions] == [(2, None)]


def test_events_per_second_lost_and_policy_from_snapshots() -> None:
    m = TopModel()
    m.update_status(status([], events=1000), now=0.0)
    assert m.events_per_second is None
    m.update_status(status([], events=4000, lost=17), now=2.0)
    assert m.events_per_second == pytest.approx(1500.0)
    assert (m.lost, m.probes, m.policy_mode, m.policy_sha256) == (17, 9, "enforce", SHA)
    assert (m.rules, m.kernel_rules) == (4, 1)
    m.update_status(status([], events=10), now=3.0)  # the monitor restarted in between
    assert m.events_per_second is None


def test_the_model_reads_its_clock_when_no_time_is_given() -> None:
    now = iter([100.0, 104.0])
    m = TopModel(clock=lambda: next(now))
    m.update_status(status([session(1, "claude", 0.0)], events=0))
    m.update_status(status([session(1, "claude", 2.0)], events=400))
    assert (m.sessions[0].cpu_rate, m.events_per_second) == (0.5, 100.0)


def test_recent_connections_and_verdicts_are_bounded_newest_kept() -> None:
    m = TopModel(recent=20)
    for port in range(1, 26):
        m.add_record(connect(port))
        m.add_record(verdict("killed", pid=port))
    assert len(m.connections) == 20 and len(m.verdicts) == 20
    assert m.connections[0].destination == "10.0.0.5:6"
    assert m.connections[-1].destination == "10.0.0.5:25"
    assert [v.pid for v in m.verdicts][-1] == 25


def test_connection_protocols_and_addresses_read_like_the_trace_view() -> None:
    m = TopModel()
    m.add_record(connect(443))
    m.add_record(connect(53, "udp", family="ipv6", address="2001:db8::1"))
    assert [(c.destination, c.protocol) for c in m.connections] == [
        ("10.0.0.5:443", "tcp"), ("[2001:db8::1]:53", "udp")]


def test_kills_are_flagged_and_would_kill_is_not_a_kill() -> None:
    m = TopModel()
    for outcome in ("killed", "killed in the kernel",
                    "agent session killed (3 processes signalled)", "would kill", "alert",
                    "refused in the kernel"):
        m.add_record(verdict(outcome))
    assert [(v.killed, v.would_kill) for v in m.verdicts] == [
        (True, False), (True, False), (True, False), (False, True), (False, False),
        (False, False)]


def test_other_record_kinds_are_ignored() -> None:
    m = TopModel()
    for kind in ("exec", "fork", "exit", "verdict"):
        m.add_record({"event": kind, "agent": "claude", "pid": 1, "session": 1})
    assert not m.connections and not m.verdicts


# --- the frame ---------------------------------------------------------------------------


def busy_model(mode: str = "enforce") -> TopModel:
    m = TopModel(wall=lambda: 0.0)
    m.update_status(status([session(1, "claude", 1.0), session(2, "ci-bot", 5.0)],
                           events=100, mode=mode), now=0.0)
    m.update_status(status([session(1, "claude", 3.0), session(2, "ci-bot", 5.1)],
                           events=2100, lost=3, mode=mode,
                           verdicts=[{"agent": "claude", "rule": "no-ssh", "action": "kill",
                                      "mode": mode, "count": 2}]), now=2.0)
    m.add_record(connect(443))
    m.add_record(connect(22, "udp"))
    m.add_record(verdict("alert", rule="curl-pipe-sh", action="alert"))
    m.add_record(verdict("killed" if mode == "enforce" else "would kill"))
    return m


def line_with(text: str, needle: str) -> str:
    return next(line for line in text.splitlines() if needle in line)


def test_the_frame_shows_sessions_by_cpu_totals_and_recent_activity() -> None:
    out = text_of(busy_model())
    assert out.index("claude") < out.index("ci-bot")  # 100% of a core before 5%
    row = line_with(out, "1001")
    assert "claude" in row and "100.0" in row and "3.00s" in row
    assert "events/s 1,000" in out and "lost 3" in out and "probes 9" in out
    assert "ENFORCE" in out and "ab12cd34ef56" in out and "MONITOR" not in out
    assert "udp" in line_with(out, "10.0.0.5:22")
    assert "since the monitor started: no-ssh ×2" in out


def test_a_kill_verdict_is_a_red_line_with_rule_outcome_and_pid() -> None:
    out = text_of(busy_model())
    kill = line_with(out, "no-ssh ")
    assert "killed" in kill and "4242" in kill and "203.0.113.9:22" in kill
    styled = text_of(busy_model(), styles=True)
    assert "\x1b[1;31m" in line_with(styled, "killed")  # bold red
    assert "\x1b[1;31m" not in line_with(styled, "curl-pipe-sh")


def test_monitor_mode_is_called_out() -> None:
    out = text_of(busy_model("monitor"))
    assert "MONITOR MODE" in out and "nothing is killed" in out
    assert "would kill" in line_with(out, "no-ssh ")


def test_an_empty_monitor_says_how_to_start_a_session() -> None:
    m = TopModel()
    m.update_status(status([]))
    out = text_of(m)
    assert "no agent sessions" in out and "agentwatch exec --agent" in out
    assert "claude, ci-bot" in out and "no verdicts since the monitor started" in out


def test_a_closed_stream_is_shown_in_the_header() -> None:
    records: queue.SimpleQueue[object] = queue.SimpleQueue()
    _pump(iter([connect(443)]), records, threading.Event())
    m = TopModel()
    _drain(m, records)
    assert len(m.connections) == 1
    assert "the monitor closed the event stream" in text_of(m)


# --- agent text on the operator's terminal ----------------------------------------------

HOSTILE = "[/x]\x1b[2J\x1b]0;owned\x07\x9b2J\r\n\u202e[bold]"
RAW = b"\xff\x9b".decode("utf-8", "surrogateescape")  # argv bytes that are not UTF-8
_SGR = re.compile(r"\x1b\[[0-9;]*m")  # rich's own colours


def hostile_model() -> TopModel:
    """Every string top shows, chosen by an agent (comm, exe, argv in a reason) or taken
    from a record an agent's process caused."""
    m = TopModel(wall=lambda: 0.0)
    st = status([session(1, f"bot{HOSTILE}", 1.0)], mode="enforce",
                verdicts=[{"agent": HOSTILE, "rule": HOSTILE, "action": HOSTILE,
                           "mode": HOSTILE, "count": 1}])
    st["agents"] = [HOSTILE]
    st["policy"]["source"] = HOSTILE
    st["policy"]["sha256"] = HOSTILE
    m.update_status(st, now=0.0)
    m.add_record({**connect(443, HOSTILE, address=f"10.0.0.5{HOSTILE}"), "comm": HOSTILE,
                  "agent": HOSTILE})
    m.add_record({**verdict(f"killed{HOSTILE}", rule=HOSTILE, action=HOSTILE, mode=HOSTILE,
                          kind=Outcome.KILLED),
                  "agent": HOSTILE, "reason": f"exe /tmp/{RAW}{HOSTILE}"})
    m.stream_error = f"the event stream failed: {HOSTILE}"
    return m


@pytest.mark.parametrize("styles", [False, True])
def test_hostile_agent_text_is_shown_escaped_never_acted_on(styles: bool) -> None:
    out = text_of(hostile_model(), styles=styles, width=600)  # "[/x]" as markup raised
    bare = _SGR.sub("", out)
    for bad in ("\x1b", "\x07", "\x9b", "\r", "\u202e"):
        assert bad not in bare, f"{bad!r} reached the terminal"
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in bare.replace(
        "\n", "")), "a control or format character reached the terminal"
    assert "[/x]\\x1b[2J" in bare  # shown as text, visibly escaped
    assert "\\x1b]0;owned\\x07" in bare and "\\u202e" in bare and "\\xff\\x9b" in bare


def test_a_comm_that_looks_like_markup_is_shown_as_it_is() -> None:
    m = TopModel(wall=lambda: 0.0)
    m.update_status(status([]))
    for comm in ("[/x]", "[bold red]", "[link=http://evil]x[/link]", "\\[/]"):
        m.add_record({**connect(443), "comm": comm})
    out = text_of(m, styles=True)
    for comm in ("[/x]", "[bold red]", "[link=http://evil]x[/link]"):
        assert comm in _SGR.sub("", out)
    assert "\x1b]8;" not in out  # no hyperlink made from agent text


# --- run_top against a real control socket -----------------------------------------------


class FakeMonitor:
    """A status handler whose sessions burn 0.5 CPU seconds per call."""

    def __init__(self) -> None:
        self.calls = 0

    def status(self, req: dict[str, Any], pid: int) -> dict[str, Any]:
        self.calls += 1
        return status([session(1, "claude", 0.5 * self.calls),
                       session(2, "ci-bot", 0.0, procs=1)], events=100 * self.calls)


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[tuple[ControlServer, FakeMonitor]]:
    fake = FakeMonitor()
    server = ControlServer(tmp_path / "run" / "control.sock", {"status": fake.status},
                           Subscribers())
    server.start()
    yield server, fake
    server.stop()


def when_subscribed(server: ControlServer, lines: list[str]) -> threading.Thread:
    """Send stream lines as soon as someone subscribes, as the monitor does."""
    def send() -> None:
        deadline = time.monotonic() + 5
        while not server.subscribers and time.monotonic() < deadline:
            time.sleep(0.01)
        for line in lines:
            server.subscribers.send(line)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


def recorded() -> Console:
    return Console(record=True, width=120, file=io.StringIO())


def test_once_prints_one_frame_with_rates_and_streamed_records(
        monitor: tuple[ControlServer, FakeMonitor]) -> None:
    server, fake = monitor
    sender = when_subscribed(server, [json.dumps(connect(8443)), json.dumps(verdict("killed"))])
    console = recorded()
    assert run_top(server.path, interval=0.5, once=True, console=console) == 0
    sender.join(timeout=5)
    out = console.export_text()
    assert fake.calls == 2
    assert "claude" in line_with(out, "1001") and "ci-bot" in line_with(out, "1002")
    assert out.index("claude") < out.index("ci-bot")
    assert "10.0.0.5:8443" in out and "killed" in line_with(out, "no-ssh ")
    assert isinstance(console.file, io.StringIO)
    assert "\x1b[?1049h" not in console.file.getvalue()


def test_once_with_interval_zero_takes_one_snapshot(
        monitor: tuple[ControlServer, FakeMonitor]) -> None:
    server, fake = monitor
    console = recorded()
    assert run_top(server.path, interval=0, once=True, console=console) == 0
    assert fake.calls == 1 and not server.subscribers
    assert "claude" in line_with(console.export_text(), "1001")


def test_live_view_redraws_until_stopped(monitor: tuple[ControlServer, FakeMonitor]) -> None:
    server, fake = monitor
    stop = threading.Event()
    when_subscribed(server, [json.dumps(connect(9000))])
    threading.Timer(0.8, stop.set).start()
    console = recorded()  # not a terminal: the last frame is printed when top stops
    assert run_top(server.path, interval=0.2, console=console, stop=stop) == 0
    out = console.export_text()
    assert fake.calls >= 3 and "10.0.0.5:9000" in out and "claude" in out


def test_no_monitor_is_a_control_error_that_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no agentwatch monitor is listening.*agentwatch run"):
        run_top(tmp_path / "absent.sock", once=True, console=recorded())
    assert ControlError.exit_code == 4


def test_a_refused_status_is_a_control_error(tmp_path: Path) -> None:
    def refuse(req: dict[str, Any], pid: int) -> dict[str, Any]:
        return {"ok": False, "error": "status is unavailable while reloading"}

    server = ControlServer(tmp_path / "c.sock", {"status": refuse}, Subscribers())
    server.start()
    try:
        with pytest.raises(ControlError, match="unavailable while reloading"):
            run_top(server.path, once=True, console=recorded())
    finally:
        server.stop()
