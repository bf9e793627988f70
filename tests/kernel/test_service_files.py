"""The systemd unit and `agentwatch install`: the unit passes `systemd-analyze verify` as
installed, says what the service needs (notify, watchdog, restart, SIGHUP reload, a narrow
capability set, writable paths that match the config's defaults), and install() writes the
unit, config and policy with the right modes, never overwrites a file the admin edited
(force keeps a .bak), and writes files the monitor's own loaders accept."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import IN_CI

from monitor.config.load import check_trusted, load_config
from monitor.policy.load import load_policy
from monitor.service.install import (
    AUDIT_LOG,
    MANIFEST,
    UNIT_PATH,
    Installer,
    install,
    unit_text,
    wanted_files,
)

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "agentwatch.service"
INSTALL_SH = REPO / "packaging" / "install.sh"
CONFIG = "etc/agentwatch/config.yaml"
POLICY = "etc/agentwatch/policy.yaml"


def settings(text: str, section: str = "Service") -> dict[str, list[str]]:
    """Key -> values of one section of a unit file, as systemd reads them (a key may repeat;
    an empty assignment resets the list)."""
    out: dict[str, list[str]] = {}
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current != section or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        out[key] = [] if value == "" else [*out.get(key, []), value]
    return out


def one(unit: dict[str, list[str]], key: str) -> str:
    values = unit.get(key, [])
    assert len(values) == 1, f"{key}= should be set once, is {values}"
    return values[0]


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return settings(UNIT.read_text())


# --- the unit as systemd sees it --------------------------------------------------------


def verify_installed(root: Path) -> None:
    """`systemd-analyze verify` the unit install() wrote under `root` (and its drop-ins).

    verify needs every Exec*= binary and the units it depends on to exist: give the temp
    root systemd's own units and stand-ins for the binaries. It exits 0 on unknown keys and
    bad values (it only warns), so any output is a failure."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if IN_CI:
            pytest.fail("systemd-analyze is missing in CI: apt-get install systemd")
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    shutil.copytree(Path("/usr/lib/systemd/system"), root / "usr/lib/systemd/system",
                    symlinks=True, dirs_exist_ok=True)
    unit = settings((root / UNIT_PATH).read_text())
    for key in ("ExecStart", "ExecReload", "ExecStartPre", "ExecStartPost", "ExecStop"):
        for cmd in unit.get(key, []):
            binary = root / cmd.lstrip("-@:+!").split()[0].lstrip("/")
            binary.parent.mkdir(parents=True, exist_ok=True)
            binary.write_text("#!/bin/sh\n")
            binary.chmod(0o755)
    done = subprocess.run([analyze, "verify", f"--root={root}", "agentwatch.service"],
                          capture_output=True, text=True, timeout=60)
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and output == "", output


def test_systemd_analyze_verify_passes_on_the_installed_unit(tmp_path: Path) -> None:
    install(str(tmp_path))
    verify_installed(tmp_path)


def test_the_pin_dir_drop_in_in_the_docs_verifies(tmp_path: Path) -> None:
    doc = (REPO / "docs" / "service.md").read_text()
    section = doc[doc.index("## Pinned probes"):]
    drop_in = section[section.index("```ini\n") + 7:section.index("```\n", 10)]
    assert "CAP_SYS_ADMIN" in drop_in and "/sys/fs/bpf" in drop_in
    install(str(tmp_path))
    d = tmp_path / (UNIT_PATH + ".d")
    d.mkdir()
    (d / "pin.conf").write_text(drop_in)
    verify_installed(tmp_path)


def test_unit_is_a_notify_service_with_watchdog_restart_and_reload(
        unit: dict[str, list[str]]) -> None:
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    watchdog = one(unit, "WatchdogSec")
    assert watchdog.endswith("s") and 0 < int(watchdog[:-1]) <= 60
    assert one(unit, "Restart") == "always"
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(unit, "KillSignal") == "SIGTERM"
    assert "2" in one(unit, "RestartPreventExitStatus").split()  # bad policy: stay failed
    assert int(one(unit, "OOMScoreAdjust")) <= -900
    start = one(unit, "ExecStart").split()
    assert start[1:] == ["run", "--config", "/etc/agentwatch/config.yaml",
                         "--policy", "/etc/agentwatch/policy.yaml"]


def test_exec_start_is_what_install_sh_links() -> None:
    start = one(settings(UNIT.read_text()), "ExecStart").split()[0]
    assert f"BIN={start}\n" in INSTALL_SH.read_text()


def test_capabilities_are_the_ones_bpf_needs_and_nothing_dangerous(
        unit: dict[str, list[str]]) -> None:
    caps = set(" ".join(unit["CapabilityBoundingSet"]).split())
    assert {"CAP_BPF", "CAP_PERFMON", "CAP_KILL", "CAP_SYS_PTRACE"} <= caps
    assert not caps & {"CAP_SYS_MODULE", "CAP_NET_RAW", "CAP_SYS_RAWIO", "CAP_SYS_BOOT",
                       "CAP_SETUID", "CAP_SETGID", "CAP_DAC_OVERRIDE", "CAP_CHOWN",
                       "CAP_FOWNER", "CAP_SYS_TIME", "CAP_MKNOD", "CAP_LINUX_IMMUTABLE"}
    assert not unit.get("AmbientCapabilities")
    assert one(unit, "NoNewPrivileges") == "yes"


def test_sandboxing_leaves_bpf_what_it_needs(unit: dict[str, list[str]]) -> None:
    # /lib/modules must stay readable: BCC compiles against its headers at every start.
    assert unit.get("ProtectKernelModules", ["no"]) == ["no"]
    # capabilities inside a user namespace do not count for bpf(2)
    assert unit.get("PrivateUsers", ["no"]) == ["no"]
    # the monitor must see every process
    assert unit.get("ProtectProc", ["default"]) == ["default"]
    syscalls = " ".join(unit.get("SystemCallFilter", [])).split()
    if syscalls:
        assert {"bpf", "perf_event_open"} <= set(syscalls)
    families = " ".join(unit["RestrictAddressFamilies"]).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert one(unit, "ProtectSystem") == "strict"


def test_writable_directories_hold_what_the_config_writes(tmp_path: Path,
                                                          unit: dict[str, list[str]]) -> None:
    """Under ProtectSystem=strict only the *Directory= paths are writable: the spool, the
    control socket and the audit log of the installed config must be under them."""
    install(str(tmp_path))
    cfg = load_config(tmp_path / CONFIG)
    assert cfg.alerts.spool_dir.startswith(f"/var/lib/{one(unit, 'StateDirectory')}/")
    assert cfg.monitor.control_socket.startswith(f"/run/{one(unit, 'RuntimeDirectory')}/")
    audit = getattr(cfg.monitor, "audit_log", AUDIT_LOG)
    assert audit == AUDIT_LOG
    assert audit.startswith(f"/var/log/{one(unit, 'LogsDirectory')}/")
    for key in ("StateDirectoryMode", "RuntimeDirectoryMode"):
        assert int(one(unit, key), 8) & 0o077 == 0, f"{key}: root only"


# --- agentwatch install ---------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_writes_unit_config_and_policy_with_their_modes(tmp_path: Path) -> None:
    lines = install(str(tmp_path))
    for rel in (UNIT_PATH, CONFIG, POLICY):
        path = tmp_path / rel
        assert mode(path) == 0o644, rel
        assert f"installed {path}" in lines
        if os.geteuid() == 0:
            assert (path.stat().st_uid, path.stat().st_gid) == (0, 0)
    assert mode(tmp_path / "etc/agentwatch") == 0o755
    assert mode(tmp_path / "var/lib/agentwatch") == 0o700
    assert (tmp_path / UNIT_PATH).read_text() == UNIT.read_text()
    assert any(line.startswith("not running systemctl") for line in lines)


def test_installed_config_and_policy_load_and_are_trusted(tmp_path: Path) -> None:
    install(str(tmp_path))
    cfg = load_config(tmp_path / CONFIG)
    policy = load_policy(tmp_path / POLICY)
    assert policy.rules and {a.name for a in policy.agents}.isdisjoint(a.name for a in cfg.agents)
    if os.geteuid() == 0:  # the service refuses files an agent could have edited
        check_trusted(tmp_path / CONFIG)
        check_trusted(tmp_path / POLICY)


def test_second_run_keeps_what_the_admin_edited(tmp_path: Path) -> None:
    install(str(tmp_path))
    policy = tmp_path / POLICY
    edited = policy.read_text().replace("mode: enforce", "mode: monitor")
    assert edited != policy.read_text()
    policy.write_text(edited)
    lines = install(str(tmp_path))
    assert policy.read_text() == edited
    assert any(line.startswith(f"kept existing {policy}") for line in lines)
    assert f"unchanged {tmp_path / CONFIG}" in lines
    assert not list(policy.parent.glob("*.bak*"))


def test_force_replaces_and_keeps_a_bak(tmp_path: Path) -> None:
    install(str(tmp_path))
    config = tmp_path / CONFIG
    config.write_text(config.read_text() + "# mine\n")
    edited = config.read_text()
    lines = install(str(tmp_path), force=True)
    assert config.with_name("config.yaml.bak").read_text() == edited
    assert config.read_text() == wanted_files()[1].text
    assert mode(config) == 0o644
    assert any(line.startswith(f"replaced {config}") for line in lines)
    config.write_text("# mine again\n" + wanted_files()[1].text)
    install(str(tmp_path), force=True)  # an existing .bak is not overwritten
    assert config.with_name("config.yaml.bak").read_text() == edited
    assert config.with_name("config.yaml.bak.1").read_text().startswith("# mine again")


def run_with(prefix: Path, unit: str, **kw: Any) -> list[str]:
    """install() with this unit text instead of the packaged one (a later version)."""
    return Installer(prefix, **kw).run(wanted_files(unit))


def test_an_upgrade_updates_files_nobody_edited_and_keeps_edited_ones(tmp_path: Path) -> None:
    run_with(tmp_path, "[Unit]\nDescription=v1\n")
    unit = tmp_path / UNIT_PATH
    lines = run_with(tmp_path, "[Unit]\nDescription=v2\n")
    assert unit.read_text() == "[Unit]\nDescription=v2\n"
    assert any(line.startswith(f"updated {unit}") for line in lines)
    assert not list(unit.parent.glob("*.bak*"))
    unit.write_text("[Unit]\nDescription=mine\n")
    run_with(tmp_path, "[Unit]\nDescription=v3\n")
    assert unit.read_text() == "[Unit]\nDescription=mine\n"
    assert mode(tmp_path / MANIFEST) == 0o600


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    lines = install(str(tmp_path), dry_run=True)
    assert list(tmp_path.iterdir()) == []
    assert f"would install {tmp_path / POLICY}" in lines


def test_systemctl_only_on_the_running_system_under_systemd(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    def booted() -> bool:
        return True

    lines = run_with(tmp_path, UNIT.read_text(), booted=booted, run=runner)
    assert calls == [] and f"installed into {tmp_path}" in lines[-1]
    # on "/" a dry run says what it would run, and runs and writes nothing
    lines = Installer(Path("/"), dry_run=True, booted=booted, run=runner).run(wanted_files())
    assert calls == []
    assert lines[-2:] == ["would run `systemctl daemon-reload`",
                          "would run `systemctl enable agentwatch.service`"]
    lines = Installer(Path("/"), dry_run=True, booted=lambda: False, run=runner).run(
        wanted_files())
    assert lines[-1].startswith("not running systemctl: PID 1 is not systemd")


def test_the_unit_install_finds_is_the_one_in_packaging() -> None:
    assert unit_text() == UNIT.read_text()
