"""Registering a process by hand, `agentwatch exec` (monitor/sessions/registry.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.model.errors import ControlError
from monitor.model.events import (
    SESSION_KERNEL_BIT,
)
from tests.support.monitor import (
    ME,
    B,
    FakePeer,
    agent_tree,
    rig,
)

# --- register (agentwatch exec) ------------------------------------------------------------


def test_register_starts_a_session(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    s = r.mon.registry.register(B + 10, "my-tool")
    assert s.agent == "my-tool" and s.root_pid == B + 10
    assert not s.id & SESSION_KERNEL_BIT
    idx = r.mon.agents.index("my-tool")
    assert r.mon.agents.name(idx) == "my-tool"
    assert r.probes.track_calls == [(B + 10, s.id, idx, 0)]
    assert r.mon.tracker.session(s.id) is s
    (log,) = r.log.find("agent session started")
    assert log["root_pid"] == B + 10 and log["agent"] == "my-tool"


def test_register_refuses_already_tracked_pid(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    r.mon.adopter.adopt_running()
    calls = list(r.probes.track_calls)
    sessions = {s.id for s in r.mon.tracker.sessions()}
    with pytest.raises(ControlError, match=f"process {B + 2} is already tracked as part of "
                       "agent 'claude-code'"):
        r.mon.registry.register(B + 2, "other")
    assert r.probes.track_calls == calls
    assert {s.id for s in r.mon.tracker.sessions()} == sessions
    proc = r.mon.tracker.process(B + 2)
    assert proc is not None
    session = r.mon.tracker.session(proc.session)
    assert session is not None
    assert session.agent == "claude-code"


def test_register_refuses_missing_pid(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    with pytest.raises(ControlError, match=f"process {B + 99} is gone"):
        r.mon.registry.register(B + 99, "x")
    assert r.probes.track_calls == []
    assert r.mon.tracker.sessions() == []


def test_register_refuses_the_monitor_itself(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    with pytest.raises(ControlError, match="monitor"):
        r.mon.registry.register(ME, "x")
    assert r.probes.track_calls == []


def test_register_op_reply(tmp_path: Path) -> None:
    r = rig(tmp_path)
    agent_tree(r.proc)
    reply = r.mon.registry.op_register({"op": "register", "agent": "tool"}, FakePeer(B + 10))
    assert reply["ok"] is True and reply["pid"] == B + 10
    assert r.mon.tracker.session(reply["session"]) is not None
    again = r.mon.registry.op_register({"op": "register", "agent": "tool"}, FakePeer(B + 10))
    assert again["ok"] is False and "already tracked" in again["error"]
    for bad in ("", None, 5, "x" * 64, "bot\x1b]0;pwned\x07", "a\nb", "bad-\udcff"):
        refused = r.mon.registry.op_register({"op": "register", "agent": bad}, FakePeer(B + 1))
        assert refused["ok"] is False and "1-63 printable characters" in refused["error"]
    assert not r.probes.is_tracked(B + 1)


def test_register_refuses_a_peer_that_exited_before_its_request_was_handled(
        tmp_path: Path) -> None:
    """The pid the request came from now names another process (or none): registering it
    would make an innocent process an agent root."""
    r = rig(tmp_path)
    agent_tree(r.proc)
    reply = r.mon.registry.op_register({"op": "register", "agent": "tool"},
                               FakePeer(B + 10, alive=False))
    assert reply["ok"] is False and "exited before it was registered" in reply["error"]
    assert r.probes.track_calls == []
    assert r.mon.tracker.sessions() == []
    assert not r.log.find("agent session started")
