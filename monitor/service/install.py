"""`agentwatch install`: put the systemd unit, the config and the policy in place.

Writes PREFIX/etc/systemd/system/agentwatch.service, PREFIX/etc/agentwatch/config.yaml and
PREFIX/etc/agentwatch/policy.yaml (the embedded defaults, with a header), and creates
PREFIX/var/lib/agentwatch. Files are handled like dpkg conffiles: a file the admin changed
is never overwritten (unless force=True, and then the old one is kept as FILE.bak); a file
that is still exactly what an earlier install wrote is brought up to date. What an install
wrote is recorded in PREFIX/var/lib/agentwatch/installed.json to tell the two apart.

It runs `systemctl daemon-reload` and `systemctl enable` only on the running system (PREFIX
is "/") when PID 1 is systemd. It never starts, stops or restarts the service, and never
touches anything outside the paths above.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from monitor import __version__
from monitor.config.types import MonitorSettings
from monitor.model.errors import EnvironmentProblem

UNIT_NAME = "agentwatch.service"
UNIT_PATH = "etc/systemd/system/" + UNIT_NAME
CONFIG_DIR = "etc/agentwatch"
STATE_DIR = "var/lib/agentwatch"
MANIFEST = STATE_DIR + "/installed.json"
SHARE_UNIT = Path("/usr/share/agentwatch") / UNIT_NAME
PIN_DIR = "/sys/fs/bpf/agentwatch"
AUDIT_LOG = "/var/log/agentwatch/audit.jsonl"  # in the unit's LogsDirectory=

_HEADER = """\
# /etc/agentwatch/{name}: installed by `agentwatch install` (agentwatch {version}) from the
# embedded default. Yours to edit: `agentwatch install` never overwrites a file you changed
# (`--force` replaces it and keeps the old one as {name}.bak).
# Check:  agentwatch {kind} check /etc/agentwatch/{name}
# Apply:  systemctl reload agentwatch   (a bad file leaves the running one in force)
#
"""


@dataclass(frozen=True)
class Wanted:
    """One file install() is responsible for: where (relative to the prefix) and what."""

    path: str
    text: str
    mode: int = 0o644


def unit_candidates() -> list[Path]:
    """Where the unit is looked for: the package data, the source tree, the shared copy."""
    package = Path(str(importlib.resources.files("monitor").joinpath("defaults", UNIT_NAME)))
    source = Path(__file__).resolve().parents[2] / "packaging" / UNIT_NAME
    return [package, source, SHARE_UNIT]


def unit_text(candidates: Sequence[Path] | None = None) -> str:
    for path in candidates if candidates is not None else unit_candidates():
        if path.is_file():
            return path.read_text(encoding="utf-8")
    where = ", ".join(str(p) for p in (candidates or unit_candidates()))
    raise EnvironmentProblem(f"the systemd unit {UNIT_NAME} was not found in {where}: run "
                             "`make install` from a source tree, or reinstall agentwatch")


def default_text(name: str) -> str:
    """config.yaml or policy.yaml as installed: the embedded default under a header. The
    service's config also turns the audit log on, in the unit's LogsDirectory."""
    body = importlib.resources.files("monitor.defaults").joinpath(name).read_text("utf-8")
    kind = "config" if name == "config.yaml" else "policy"
    if kind == "config" and "audit_log" in {f.name for f in fields(MonitorSettings)}:
        body = _with_audit_log(body)
    return _HEADER.format(name=name, version=__version__, kind=kind) + body


def _with_audit_log(body: str) -> str:
    setting = (f"  audit_log: {AUDIT_LOG}   # set by `agentwatch install`\n"
               f"  pin_dir: {PIN_DIR}   # probes outlive the monitor; `agentwatch detach`\n")
    lines = body.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip() == "monitor:":
            return "".join(lines[:i + 1] + [setting] + lines[i + 1:])
    return body + ("" if body.endswith("\n") else "\n") + "monitor:\n" + setting


def wanted_files(unit: str | None = None) -> list[Wanted]:
    return [
        Wanted(UNIT_PATH, unit if unit is not None else unit_text()),
        Wanted(CONFIG_DIR + "/config.yaml", default_text("config.yaml")),
        Wanted(CONFIG_DIR + "/policy.yaml", default_text("policy.yaml")),
    ]


def install(prefix: str = "/", *, force: bool = False, dry_run: bool = False) -> list[str]:
    """Install the unit, config and policy under `prefix`; returns one line per action.

    Raises EnvironmentProblem if a file cannot be written or systemctl fails.
    """
    return Installer(Path(prefix), force=force, dry_run=dry_run).run(wanted_files())


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def systemd_booted() -> bool:
    """True when PID 1 is systemd (sd_booted(3): /run/systemd/system exists)."""
    return Path("/run/systemd/system").is_dir()


Runner = Callable[[list[str]], subprocess.CompletedProcess[str]]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


class Installer:
    """One install run. The OS seams (systemd detection, command runner) are arguments."""

    def __init__(self, prefix: Path, *, force: bool = False, dry_run: bool = False,
                 booted: Callable[[], bool] = systemd_booted, run: Runner = _run) -> None:
        self.prefix = prefix
        self.force = force
        self.dry_run = dry_run
        self.booted = booted
        self.runner = run
        self.lines: list[str] = []
        self.as_root = os.geteuid() == 0

    def path(self, rel: str) -> Path:
        return self.prefix / rel

    def say(self, done: str, would: str | None = None) -> None:
        """Report an action: `done` after doing it, `would` (default: "would " + done)
        when this is a dry run."""
        self.lines.append((would or "would " + done) if self.dry_run else done)

    def warn(self, line: str) -> None:
        self.lines.append("warning: " + line)

    def run(self, wanted: Sequence[Wanted]) -> list[str]:
        manifest = self._read_manifest()
        written: dict[str, str] = {}
        try:
            self._dir(CONFIG_DIR, 0o755)
            self._dir("etc/systemd/system", 0o755)
            self._dir(STATE_DIR, 0o700)
            for w in wanted:
                digest = self._file(w, manifest.get("/" + w.path))
                if digest is not None:
                    written["/" + w.path] = digest
            if written:
                self._write_manifest({**manifest, **written})
        except OSError as exc:
            raise EnvironmentProblem(
                f"install into {self.prefix} failed: {exc.strerror or exc} "
                f"({exc.filename}); run it as root, or pass another prefix") from exc
        self._check_exec_start(wanted[0].text)
        self._systemctl()
        return self.lines

    # --- directories and files ---------------------------------------------------------

    def _dir(self, rel: str, mode: int) -> None:
        path = self.path(rel)
        if path.is_dir():
            st = path.stat()
            if st.st_mode & 0o022 and rel != "etc/systemd/system":
                # reported, never changed behind the admin's back
                self.warn(f"{path} is writable by group or others: `chmod go-w {path}`")
            return
        self.say(f"created {path}/ (mode {mode:04o})", f"would create {path}/ (mode {mode:04o})")
        if not self.dry_run:
            path.mkdir(parents=True, exist_ok=True)
            os.chmod(path, mode)  # mkdir's mode is filtered by the umask
            self._chown(path)

    def _file(self, w: Wanted, recorded: str | None) -> str | None:
        """Install one file; returns the digest written (for the manifest), or None."""
        path = self.path(w.path)
        new = w.text.encode("utf-8")
        if not path.exists():
            self._write(path, new, w.mode)
            self.say(f"installed {path}", f"would install {path}")
            return _sha256(new)
        old = path.read_bytes()
        if old == new:
            self.lines.append(f"unchanged {path}")
            self._check_owner(path)
            return _sha256(new)
        ours = recorded is not None and recorded == _sha256(old)
        if ours or self.force:
            backup = None if ours else self._backup(path, old)
            self._write(path, new, w.mode)
            if backup is None:
                self.say(f"updated {path} (an earlier install's copy, not edited since)",
                         f"would update {path} (an earlier install's copy, not edited since)")
            else:
                self.say(f"replaced {path} (--force); the previous one is kept as {backup}",
                         f"would replace {path} (--force), keeping the previous one as "
                         f"{backup}")
            return _sha256(new)
        self.lines.append(f"kept existing {path} (it differs from agentwatch {__version__}'s "
                          "version: `agentwatch install --force` replaces it, keeping a .bak)")
        self._check_owner(path)
        return None

    def _check_owner(self, path: Path) -> None:
        """Warn about a kept file the monitor would refuse (the policy must be root-owned and
        not writable by others)."""
        st = path.stat()
        if st.st_mode & 0o022 or (self.as_root and st.st_uid != 0):
            self.warn(f"{path} is not root-owned or is writable by group or others: "
                      f"`chown root:root {path}; chmod 0644 {path}`")

    def _backup(self, path: Path, data: bytes) -> Path:
        backup = path.with_name(path.name + ".bak")
        n = 0
        while backup.exists() and backup.read_bytes() != data:
            n += 1
            backup = path.with_name(f"{path.name}.bak.{n}")
        if not self.dry_run:
            shutil.copy2(path, backup)
        return backup

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        """Atomically: a temp file in the same directory, fsync, rename."""
        if self.dry_run:
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                if self.as_root:
                    os.fchown(f.fileno(), 0, 0)
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _chown(self, path: Path) -> None:
        if self.as_root:
            os.chown(path, 0, 0)

    def _read_manifest(self) -> dict[str, str]:
        try:
            data = json.loads(self.path(MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}  # none yet (or unreadable): every differing file counts as the admin's
        files = data.get("files") if isinstance(data, dict) else None
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if isinstance(k, str) and isinstance(v, str)}

    def _write_manifest(self, files: dict[str, str]) -> None:
        text = json.dumps({"installed_by": f"agentwatch {__version__}", "files": files},
                          indent=2, sort_keys=True) + "\n"
        self._write(self.path(MANIFEST), text.encode(), 0o600)

    # --- checks and systemctl ----------------------------------------------------------

    def _check_exec_start(self, unit: str) -> None:
        for line in unit.splitlines():
            if line.startswith("ExecStart="):
                binary = line.split("=", 1)[1].split()[0].lstrip("-@:+!")
                target = self.path(binary.lstrip("/"))
                if not os.access(target, os.X_OK):
                    self.warn(f"{target} (the unit's ExecStart) is missing or not "
                              "executable: `make install` (packaging/install.sh) links it")
                return

    def _systemctl(self) -> None:
        if self.prefix.resolve() != Path("/"):
            self.lines.append(f"not running systemctl: installed into {self.prefix}, not "
                              "the running system")
            return
        if not self.booted():
            self.lines.append("not running systemctl: PID 1 is not systemd; run the monitor "
                              "with `agentwatch run --config /etc/agentwatch/config.yaml "
                              "--policy /etc/agentwatch/policy.yaml`")
            return
        for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", UNIT_NAME]):
            shown = " ".join(argv)
            if self.dry_run:
                self.lines.append(f"would run `{shown}`")
                continue
            done = self.runner(argv)
            if done.returncode != 0:
                raise EnvironmentProblem(
                    f"`{shown}` failed (exit {done.returncode}): "
                    f"{(done.stderr or done.stdout).strip()}; the files are installed: "
                    + "; ".join(self.lines))
            self.lines.append(f"ran `{shown}`")
        if not self.dry_run:
            self.lines.append(f"{UNIT_NAME} is enabled: it starts at boot (now: "
                              "`systemctl start agentwatch`)")
