"""Unit tests for monitor.model.records and monitor.model.outcome: what the monitor streams is
what a reader gets back, and an outcome is named one way everywhere."""

from __future__ import annotations

import json
from typing import Any

import pytest

from monitor.model import events as e
from monitor.model.outcome import Outcome
from monitor.model.records import (
    ConnectRecord,
    PolicyVerdictRecord,
    StatusReply,
    parse_record,
)
from monitor.observe.output import record

H = e.Header(ts_ns=5_000, pid=4242, tid=4243, session=0x80000005, agent=0, uid=1000,
             comm="sh")

EVENTS: list[e.Event] = [
    e.ExecEvent(H, old_tid=4243, ppid=4000, cgroup_id=9, flags=e.ExecFlag.NEW_ROOT,
                filename="/bin/sh", argv=("sh", "-c", "true")),
    e.ConnectEvent(H, e.Family.INET6, "2001:db8::1", 443, 6),
    e.ForkEvent(H, child_pid=4300),
    e.VerdictEvent(H, e.VerdictKind.CONNECT, rule=3, mask=8, action=e.KAction.DENY,
                   enforced=True, family=2, address="203.0.113.9", port=22),
    e.ExitEvent(H, exit_status=9, ppid=4000, cpu_ns=1_000),
]


@pytest.mark.parametrize("ev", EVENTS, ids=lambda ev: type(ev).__name__)
def test_every_event_record_reads_back_as_it_was_sent(ev: e.Event) -> None:
    sent = json.loads(json.dumps(record(ev, "claude-code")))
    got = parse_record(sent)
    assert got is not None and got.to_json() == sent


def test_a_connect_record_names_its_destination() -> None:
    rec = parse_record(record(EVENTS[1], "claude-code"))
    assert isinstance(rec, ConnectRecord) and rec.destination == "[2001:db8::1]:443"


def test_unknown_kinds_and_missing_fields_do_not_raise() -> None:
    assert parse_record({"event": "teleport"}) is None
    v = parse_record({"event": "policy_verdict", "pid": "not a number"})
    assert isinstance(v, PolicyVerdictRecord) and v.pid == 0 and v.kind is None


def test_a_policy_verdict_carries_its_outcome_by_label() -> None:
    sent = PolicyVerdictRecord(agent="a", rule="r", action="kill", mode="enforce",
                               outcome="killed in the kernel", kind=Outcome.KILLED_IN_KERNEL)
    back = parse_record(json.loads(json.dumps(sent.to_json())))
    assert back == sent and isinstance(back, PolicyVerdictRecord)
    assert back.kind is not None and back.kind.killed


def test_the_status_reply_reads_back_as_it_was_sent() -> None:
    sent: dict[str, Any] = {
        "probes": 9, "probes_expected": 9, "events": 10,
        "policy": {"source": "p.yaml", "sha256": "ab", "mode": "enforce", "rules": 2,
                   "kernel_rules": ["no-ssh"]},
        "verdicts": [{"agent": "a", "rule": "r", "action": "kill", "mode": "enforce",
                      "count": 2}],
        "decode_errors": 0,
        "sessions": [{"session": 1, "agent": "a", "root_pid": 7, "processes": 2,
                      "cpu_seconds": 1.5, "execs": 3, "connects": 4}],
        "processes_evicted": 0, "counters": {"lost": 1}, "agents": ["a"]}
    assert StatusReply.from_json(sent).to_json() == sent


@pytest.mark.parametrize(("outcome", "detail", "text"), [
    (Outcome.KILLED, "", "killed"),
    (Outcome.KILLED_IN_KERNEL, "", "killed in the kernel"),
    (Outcome.REFUSED_IN_KERNEL, "", "refused in the kernel"),
    (Outcome.WOULD_KILL, "", "would kill"),
    (Outcome.WOULD_REFUSE, "", "would refuse"),
    (Outcome.ALERTED, "", "alert"),
    (Outcome.NOT_ENFORCED, "no process named", "not enforced: no process named"),
    (Outcome.SESSION_KILLED, "(3 processes signalled)",
     "agent session killed (3 processes signalled)"),
])
def test_outcomes_read_in_the_log_as_they_always_have(outcome: Outcome, detail: str,
                                                      text: str) -> None:
    assert outcome.describe(detail) == text
    assert Outcome.of_label(outcome.label) is outcome


def test_only_real_kills_are_kills() -> None:
    assert {o for o in Outcome if o.killed} == {
        Outcome.KILLED, Outcome.KILLED_IN_KERNEL, Outcome.SESSION_KILLED}
    assert {o for o in Outcome if o.would} == {Outcome.WOULD_KILL, Outcome.WOULD_REFUSE}
