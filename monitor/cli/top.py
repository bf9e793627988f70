"""`agentwatch top`: the live terminal view of a running monitor.

Three parts: `TopModel` folds `status` snapshots and event-stream records into what an
operator looks at (sessions by CPU rate, recent connections, recent verdicts, totals) and
does no I/O; `render()` turns a model into a rich renderable; `run_top()` feeds the model
from the control socket and draws it. It must never talk to anything but the monitor's
Unix control socket, and never send a request that changes the monitor (only `status`
and `subscribe`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from monitor.model.errors import ControlError
from monitor.model.outcome import Outcome
from monitor.model.records import ConnectRecord, PolicyVerdictRecord, StatusReply, VerdictTotal
from monitor.model.safetext import printable
from monitor.service import client

RECENT = 20
Clock = Callable[[], float]


@dataclass(frozen=True)
class SessionRow:
    """One agent session as of the latest snapshot."""

    session: int
    agent: str
    root_pid: int
    processes: int
    cpu_seconds: float
    cpu_rate: float | None  # CPU seconds per second since the previous snapshot (1.0 = a core)
    execs: int
    connects: int


@dataclass(frozen=True)
class Connection:
    """One connect() seen on the stream; `at` is top's wall clock when it arrived."""

    at: float
    agent: str
    session: int
    pid: int
    comm: str
    destination: str
    protocol: str  # "tcp", "udp", ...: connects are seen as they start, so no result


@dataclass(frozen=True)
class VerdictRow:
    """One policy verdict seen on the stream (the fields of the monitor's verdict log line)."""

    at: float
    agent: str
    rule: str
    action: str
    mode: str
    outcome: str  # the log line's text, shown as it is
    pid: int
    session: int
    reason: str
    kind: Outcome | None = None  # what the record says became of the verdict

    @property
    def killed(self) -> bool:
        """Something was really killed (in userspace, in the kernel, a whole session);
        "would kill" in monitor mode is not a kill."""
        return self.kind is not None and self.kind.killed

    @property
    def would_kill(self) -> bool:
        return self.kind is not None and self.kind.would


class TopModel:
    """What `top` shows, folded from snapshots and records; pure: the clocks are injected."""

    def __init__(self, recent: int = RECENT, clock: Clock = time.monotonic,
                 wall: Clock = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self.sessions: list[SessionRow] = []
        self.connections: deque[Connection] = deque(maxlen=recent)
        self.verdicts: deque[VerdictRow] = deque(maxlen=recent)
        self.verdict_totals: list[VerdictTotal] = []
        self.agents: list[str] = []
        self.snapshots = 0
        self.events = 0
        self.events_per_second: float | None = None
        self.lost = 0
        self.decode_errors = 0
        self.probes = 0
        self.policy_mode = ""
        self.policy_sha256 = ""
        self.policy_source = ""
        self.rules = 0
        self.kernel_rules = 0
        self.stream_error: str | None = None
        self._prev_at: float | None = None
        self._prev_cpu: dict[int, float] = {}

    def update_status(self, status: Mapping[str, Any] | StatusReply,
                      now: float | None = None) -> None:
        """Fold one `status` reply; rates come from the difference with the previous one."""
        st = status if isinstance(status, StatusReply) else StatusReply.from_json(status)
        now = self._clock() if now is None else now
        dt = now - self._prev_at if self._prev_at is not None else 0.0
        if dt > 0 and st.events >= self.events:
            self.events_per_second = (st.events - self.events) / dt
        else:  # first snapshot, or the monitor restarted in between
            self.events_per_second = None
        rows = []
        for s in st.sessions:
            before = self._prev_cpu.get(s.session)
            rate = (max(s.cpu_seconds - before, 0.0) / dt
                    if dt > 0 and before is not None else None)
            rows.append(SessionRow(s.session, s.agent, s.root_pid, s.processes, s.cpu_seconds,
                                   rate, s.execs, s.connects))
        rows.sort(key=lambda r: (r.cpu_rate if r.cpu_rate is not None else -1.0,
                                 r.cpu_seconds), reverse=True)
        self.sessions = rows
        self._prev_cpu = {r.session: r.cpu_seconds for r in rows}
        self._prev_at = now
        self.snapshots += 1
        self.events = st.events
        self.lost = st.counters.get("lost", 0)
        self.decode_errors = st.decode_errors
        self.probes = st.probes
        self.policy_mode = st.policy.mode
        self.policy_sha256 = st.policy.sha256
        self.policy_source = st.policy.source
        self.rules = st.policy.rules
        self.kernel_rules = len(st.policy.kernel_rules)
        self.verdict_totals = list(st.verdicts)
        self.agents = list(st.agents)

    def add_record(self, rec: Mapping[str, Any], at: float | None = None) -> None:
        """Fold one stream record; kinds other than connect and policy_verdict are ignored."""
        at = self._wall() if at is None else at
        kind = rec.get("event")
        if kind == ConnectRecord.EVENT:
            c = ConnectRecord.from_json(rec)
            self.connections.append(Connection(
                at, c.agent or "-", c.session, c.pid, c.comm, c.destination,
                c.protocol or "?"))
        elif kind == PolicyVerdictRecord.EVENT:
            v = PolicyVerdictRecord.from_json(rec)
            self.verdicts.append(VerdictRow(
                at, v.agent or "-", v.rule, v.action, v.mode, v.outcome, v.pid, v.session,
                v.reason or v.destination or v.exe or "", v.kind))


# --- rendering ---------------------------------------------------------------------------
# Every string shown came from the monitor, and most of it from an agent (comm, exe, argv in
# a reason, addresses): it reaches rich only as Text (never parsed as markup, so "[/x]" is
# text) and only through printable() (so no escape sequence reaches the terminal).


def _t(text: object, style: str = "") -> Text:
    return Text(printable(str(text)), style=style)


def _clock_time(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _header(model: TopModel, source: str) -> Text:
    t = Text("agentwatch top", style="bold")
    if source:
        t.append(f"  {printable(source)}", style="dim")
    t.append("\n")
    if model.policy_mode == "monitor":
        t.append(" MONITOR MODE ", style="bold black on yellow")
        t.append(" verdicts are logged, nothing is killed\n", style="yellow")
    elif model.policy_mode:
        t.append(f" {printable(model.policy_mode.upper())} ", style="bold white on red")
        t.append(" ")
    t.append(f"policy {printable(model.policy_source or '-')} sha256 "
             f"{printable(model.policy_sha256[:12] or '-')} ({model.rules} rules, "
             f"{model.kernel_rules} in the kernel)\n")
    t.append("probes ")
    t.append(str(model.probes), style="bold red" if model.probes == 0 else "bold")
    t.append("  events/s ")
    eps = model.events_per_second
    t.append(f"{eps:,.0f}" if eps is not None else "-", style="bold")
    t.append(f" ({model.events:,} total)  lost ")
    t.append(f"{model.lost:,}", style="bold red" if model.lost else "bold")
    if model.decode_errors:
        t.append("  decode errors ")
        t.append(f"{model.decode_errors:,}", style="bold red")
    t.append(f"  sessions {len(model.sessions)}")
    if model.stream_error:
        t.append(f"\nevent stream: {printable(model.stream_error)} (connections and "
                 "verdicts are no longer updated)", style="red")
    return t


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 caption_justify="left", pad_edge=False, show_edge=False)


def _sessions(model: TopModel) -> Table:
    t = _table("Agent sessions, busiest first (CPU % of one core)")
    for name, right in (("AGENT", False), ("SESSION", True), ("ROOT PID", True),
                        ("PROCS", True), ("CPU%", True), ("CPU TIME", True),
                        ("EXECS", True), ("CONNECTS", True)):
        t.add_column(name, justify="right" if right else "left", no_wrap=True)
    for s in model.sessions:
        rate = f"{s.cpu_rate * 100:.1f}" if s.cpu_rate is not None else "-"
        t.add_row(_t(s.agent), _t(s.session), _t(s.root_pid), _t(s.processes), _t(rate),
                  _t(f"{s.cpu_seconds:.2f}s"), _t(s.execs), _t(s.connects))
    if not model.sessions:
        watched = ", ".join(model.agents) or "none configured"
        t.caption = _t(f"no agent sessions (agents watched: {watched}); start one with "
                       "`agentwatch exec --agent NAME -- CMD`")
    return t


def _verdicts(model: TopModel) -> Table:
    t = _table("Recent verdicts, newest first")
    for name in ("TIME", "AGENT", "RULE", "ACTION", "OUTCOME", "PID", "REASON"):
        t.add_column(name, justify="right" if name == "PID" else "left",
                     no_wrap=name != "REASON")
    for v in reversed(model.verdicts):
        style = "bold red" if v.killed else "yellow" if v.would_kill else ""
        t.add_row(_t(_clock_time(v.at)), _t(v.agent), _t(v.rule), _t(f"{v.action} ({v.mode})"),
                  _t(v.outcome), _t(v.pid), _t(v.reason), style=style)
    totals = sorted(model.verdict_totals, key=lambda v: -v.count)
    if totals:
        shown = [f"{v.rule} ×{v.count} ({v.agent}, {v.action}, {v.mode})"
                 for v in totals[:5]]
        more = f" and {len(totals) - 5} more" if len(totals) > 5 else ""
        t.caption = _t("since the monitor started: " + " · ".join(shown) + more)
    elif not model.verdicts:
        t.caption = _t("no verdicts since the monitor started")
    return t


def _connections(model: TopModel) -> Table:
    t = _table("Recent connections, newest first")
    for name in ("TIME", "AGENT", "PID", "COMM", "DESTINATION", "PROTO"):
        t.add_column(name, justify="right" if name == "PID" else "left", no_wrap=True)
    for c in reversed(model.connections):
        t.add_row(_t(_clock_time(c.at)), _t(c.agent), _t(c.pid), _t(c.comm), _t(c.destination),
                  _t(c.protocol))
    return t


def render(model: TopModel, source: str = "") -> RenderableType:
    """One frame: header, sessions by CPU rate, recent verdicts (kills in red), connections."""
    gap = Text("")
    return Group(_header(model, source), gap, _sessions(model), gap, _verdicts(model), gap,
                 _connections(model))


def _live_frame(model: TopModel, source: str) -> RenderableType:
    return Group(render(model, source), Text("\nCtrl-C quits", style="dim"))


# --- feeding the model from the control socket -------------------------------------------


def _pump(records: Iterator[dict[str, Any]], out: queue.SimpleQueue[object],
          stop: threading.Event) -> None:
    try:
        for rec in records:
            if stop.is_set():
                return
            out.put(rec)
        out.put(ControlError("the monitor closed the event stream"))
    except (OSError, ValueError) as e:  # ValueError: a malformed JSON line
        out.put(ControlError(f"the event stream failed: {e}"))


def _drain(model: TopModel, records: queue.SimpleQueue[object]) -> None:
    while True:
        try:
            item = records.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, ControlError):
            model.stream_error = str(item)
        elif isinstance(item, dict):
            model.add_record(item)


def _status(path: str | Path) -> StatusReply:
    return StatusReply.from_json(client.request(path, {"op": "status"}))


def run_top(socket_path: str | Path, interval: float = 1.0, once: bool = False, *,
            console: Console | None = None, stop: threading.Event | None = None,
            clock: Clock = time.monotonic) -> int:
    """Show the monitor on socket_path until Ctrl-C (or `stop` is set); 0 when done.

    `once` prints a single frame on the normal screen and returns: it takes two status
    snapshots `interval` seconds apart (so CPU and event rates are known) and shows the
    connections and verdicts streamed in between; with interval 0 it takes one snapshot.
    Raises ControlError when the monitor is unreachable or refuses.
    """
    if interval < 0:
        raise ValueError("interval must be 0 or more seconds")
    console = console if console is not None else Console()
    stop = stop if stop is not None else threading.Event()
    model = TopModel(clock=clock)
    source = str(socket_path)
    model.update_status(_status(socket_path))  # fails fast, with the reason, if no monitor
    if once and interval == 0:
        console.print(render(model, source))
        return 0
    records: queue.SimpleQueue[object] = queue.SimpleQueue()
    done = threading.Event()
    reader = threading.Thread(target=_pump, args=(client.stream(socket_path), records, done),
                              name="agentwatch-top-stream", daemon=True)
    reader.start()  # it ends with the stream; a blocked read dies with the process
    try:
        if once:
            stop.wait(interval)
            model.update_status(_status(socket_path))
            _drain(model, records)
            console.print(render(model, source))
            return 0
        interval = max(interval, 0.1)
        tick = min(interval, 0.25)  # new records are drawn between status polls too
        next_poll = clock() + interval
        # off a terminal (a pipe, a journal) the last frame is printed when top stops
        with Live(_live_frame(model, source), console=console, screen=console.is_terminal,
                  auto_refresh=False, redirect_stdout=False) as live:
            while not stop.wait(max(0.0, min(tick, next_poll - clock()))):
                if clock() >= next_poll:
                    model.update_status(_status(socket_path))
                    next_poll = max(next_poll + interval, clock())
                _drain(model, records)
                live.update(_live_frame(model, source), refresh=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how one leaves top
    finally:
        done.set()
    return 0
