"""The in-kernel agent matchers the daemon installs (service/reload.py install_matchers):
the kernel must pick what the config picks. FakeProbes answers lookups as the probes do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.model.events import (
    ANY_UID,
    Setting,
)
from monitor.sessions.procfs import ProcInfo
from tests.support.monitor import (
    CI_BOT,
    CLAUDE,
    SCOPED_NODE,
    USERS,
    config,
    rig,
)

# --- in-kernel matchers --------------------------------------------------------------------


def test_install_matchers_fills_kernel_tables(tmp_path: Path) -> None:
    r = rig(tmp_path)
    r.mon.reloads.install_matchers()
    assert r.probes.match_comm == {
        (b"claude".ljust(16, b"\0"), ANY_UID): CLAUDE,
        (b"node".ljust(16, b"\0"), USERS["agent"]): SCOPED_NODE,
    }
    assert r.probes.match_uid == {USERS["ci"]: CI_BOT}
    # exe/cmdline/cgroup need userspace: untracked execs must be sent as candidates
    assert r.probes.settings[Setting.EXEC_CANDIDATES] == 1
    # what the kernel then recognises by itself
    assert r.probes.kernel_match("claude", 1234) == CLAUDE
    assert r.probes.kernel_match("node", USERS["agent"]) == SCOPED_NODE
    assert r.probes.kernel_match("node", 1234) is None
    assert r.probes.kernel_match("bash", USERS["ci"]) == CI_BOT
    assert r.probes.kernel_match("goose", 1000) is None  # goose also needs its exe checked
    assert r.probes.kernel_match("python3", 1000) is None


def test_no_exec_candidates_without_userspace_matchers(tmp_path: Path) -> None:
    r = rig(tmp_path, config("""\
        agents:
          - name: claude-code
            match:
              - comm: claude
              - uid: 1500
        """))
    r.mon.reloads.install_matchers()
    assert r.probes.settings[Setting.EXEC_CANDIDATES] == 0
    assert r.probes.kernel_match("claude", 1) == 0
    assert r.probes.kernel_match("sh", 1500) == 0


@pytest.mark.parametrize("key", ["exe: /opt/x/*", "cmdline: x", "cgroup: /x/*"])
def test_any_userspace_key_turns_candidates_on(tmp_path: Path, key: str) -> None:
    r = rig(tmp_path, config(f"""\
        agents:
          - name: a
            match:
              - comm: claude
          - name: b
            match:
              - {key}
        """))
    r.mon.reloads.install_matchers()
    assert r.probes.settings[Setting.EXEC_CANDIDATES] == 1
    assert list(r.probes.match_comm.items()) == [((b"claude".ljust(16, b"\0"), ANY_UID), 0)]
    assert r.probes.match_uid == {}


def test_long_comm_is_cut_like_the_kernel_cuts_it(tmp_path: Path) -> None:
    r = rig(tmp_path, config("""\
        agents:
          - name: a
            match:
              - comm: abcdefghijklmno
        """))
    r.mon.reloads.install_matchers()
    assert r.probes.kernel_match("abcdefghijklmno", 0) == 0


def test_kernel_matchers_follow_file_order_across_comm_and_uid(tmp_path: Path) -> None:
    cfg = config("""\
        agents:
          - name: by-uid
            match:
              - uid: 1500
          - name: by-comm
            match:
              - comm: claude
          - name: scoped
            match:
              - comm: claude
                uid: 1600
              - comm: node
                uid: 1500
        """)
    r = rig(tmp_path, cfg)
    r.mon.reloads.install_matchers()
    for comm, uid in (("claude", 1500), ("claude", 1600), ("claude", 7), ("node", 1500),
                      ("node", 1600), ("sh", 1500), ("sh", 7)):
        facts = ProcInfo(1, 0, comm, "/x", (comm,), uid, "/", 1, False)
        spec = cfg.recognise(r.mon.recognizer.facts(facts))
        want = None if spec is None else [a.name for a in cfg.agents].index(spec.name)
        assert r.probes.kernel_match(comm, uid) == want, (comm, uid)


def test_kernel_matchers_agree_with_file_order(tmp_path: Path) -> None:
    cfg = config("""\
        agents:
          - name: first
            match:
              - comm: claude
          - name: second
            match:
              - comm: claude
                user: ci
        """)
    r = rig(tmp_path, cfg)
    r.mon.reloads.install_matchers()
    for uid in (1000, USERS["ci"]):
        facts = ProcInfo(1, 0, "claude", "/x", ("claude",), uid, "/", 1, False)
        spec = cfg.recognise(r.mon.recognizer.facts(facts))
        assert spec is not None and spec.name == "first"
        assert r.probes.kernel_match("claude", uid) == 0, f"uid {uid}"
