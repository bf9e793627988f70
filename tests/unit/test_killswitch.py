"""The kill switch (monitor/enforce/killswitch.py): the operator's, so it kills in monitor
mode too; latch and release. A fake signaller: no test signals a real process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.model.errors import ControlError
from monitor.policy.types import Mode
from tests.support.enforce import FakeSignaller
from tests.support.monitor import (
    AIDER,
    PENDING,
    B,
    FakePeer,
    Rig,
    agent_tree,
    kernel_candidate,
    make_proc,
    rig,
    wait_until,
)

# --- the kill switch (the operator's: it kills in monitor mode too) -------------------------


def killswitch_rig(tmp_path: Path) -> tuple[Rig, FakeSignaller]:
    """The fixture tree adopted under a monitor-mode policy, with a fake signaller: the
    fixture's pids may name real processes on this host, which no test may signal."""
    r = rig(tmp_path)
    assert r.mon.policy.mode == Mode.MONITOR
    agent_tree(r.proc)
    r.mon.adopter.adopt_running()
    signaller = FakeSignaller(r.probes)
    r.mon.enforcer.signaller = signaller
    return r, signaller


def session_of(r: Rig, root: int) -> int:
    proc = r.mon.tracker.process(root)
    assert proc is not None
    return proc.session


def test_the_kill_switch_kills_in_monitor_mode_too(tmp_path: Path) -> None:
    r, signaller = killswitch_rig(tmp_path)
    claude, aider = session_of(r, B), session_of(r, B + 20)
    reply = r.mon.kill_switch.op({"op": "killswitch", "agent": "claude-code"}, FakePeer(77),
                                 r.mon.on_loop)
    # every process of the one agent's session, none of the other agent's
    assert reply == {"ok": True, "sessions": 1, "killed": 4, "latched": []}
    assert sorted(signaller.killed) == [B, B + 1, B + 2, B + 3]
    assert r.probes.manual == {claude}  # doomed as the operator's: kills in monitor mode
    assert aider not in r.probes.doomed
    assert r.probes.session_pids(aider) == [B + 20, B + 21]
    assert r.log.find("killswitch") == [{"agent": "claude-code", "action": "kill",
                                         "sessions": [claude], "killed": 4,
                                         "requested_by": "pid 77"}]
    counts = {a.label: a.killswitch for a in r.mon.metrics.snapshot().agents}
    assert counts["claude-code"] == 1 and counts["aider"] == 0
    assert r.probes.latched == {}


def test_a_latched_kill_switch_kills_a_new_session_until_released(tmp_path: Path) -> None:
    r, signaller = killswitch_rig(tmp_path)
    reply = r.mon.kill_switch.op({"op": "killswitch", "agent": "aider", "latch": True},
                                 FakePeer(77), r.mon.on_loop)
    assert reply == {"ok": True, "sessions": 1, "killed": 2, "latched": ["aider"]}
    assert r.probes.latched == {AIDER: True}
    # registering a latched agent is refused; a new session recognised in userspace dies
    with pytest.raises(ControlError, match="the kill switch is latched for 'aider'"):
        r.mon.registry.register(B + 10, "aider")
    make_proc(r.proc, B + 30, 1, "python3", argv=("python3", "-m", "aider"))
    r.mon.handle(kernel_candidate(r, B + 30, ("python3", "-m", "aider")))
    wait_until(lambda: B + 30 in signaller.killed)
    assert PENDING in r.probes.manual
    reply = r.mon.kill_switch.op({"op": "killswitch", "agent": "aider", "release": True},
                                 FakePeer(77), r.mon.on_loop)
    assert reply == {"ok": True, "released": "aider", "latched": []}
    assert r.probes.latched == {AIDER: False}
    assert [f["action"] for f in r.log.find("killswitch")] == ["latch", "release"]


def test_the_kill_switch_refuses_an_unknown_agent(tmp_path: Path) -> None:
    r, signaller = killswitch_rig(tmp_path)
    reply = r.mon.kill_switch.op({"op": "killswitch", "agent": "nobody"}, FakePeer(77),
                                 r.mon.on_loop)
    assert reply["ok"] is False and "unknown agent 'nobody'" in reply["error"]
    assert signaller.killed == [] and r.probes.doomed == set()
