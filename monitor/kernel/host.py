"""What the host must have before the probes can load, and where their sources are.

Checks root, tracefs, kernel headers and BCC's Python bindings, and turns every missing
piece into an EnvironmentProblem with one sentence saying how to get it. Finds the cgroup v2
mount and the probes/ directory. It only looks: it never loads, attaches or writes a map
(monitor/kernel/loader.py does), and imports BCC only to see that it is there.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from monitor.model.errors import EnvironmentProblem

TRACEFS = Path("/sys/kernel/tracing")
BPF_SOURCE = "agentwatch.bpf.c"


def cgroup2_root(mounts: Path = Path("/proc/self/mounts")) -> str | None:
    """Mount point of the cgroup v2 hierarchy (/sys/fs/cgroup, or .../unified on hybrid
    hosts), or None."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 3 and parts[2] == "cgroup2":
            return parts[1]
    return None


def probes_dir() -> Path:
    """Where the C sources live: $AGENTWATCH_PROBES, the source tree, or the installed copy."""
    env = os.environ.get("AGENTWATCH_PROBES")
    candidates = [Path(env)] if env else []
    candidates += [
        Path(__file__).resolve().parents[2] / "probes",
        Path("/usr/share/agentwatch/probes"),
    ]
    for c in candidates:
        if (c / BPF_SOURCE).is_file():
            return c
    raise EnvironmentProblem(
        f"the BPF sources ({BPF_SOURCE}) were not found in "
        + ", ".join(str(c) for c in candidates)
        + ": reinstall agentwatch or set AGENTWATCH_PROBES to the probes/ directory"
    )


def check_host(tracefs: Path = TRACEFS, modules: Path = Path("/lib/modules")) -> None:
    """Raise EnvironmentProblem naming the first thing this host lacks for the probes."""
    if os.geteuid() != 0:
        raise EnvironmentProblem(
            "agentwatch needs root (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN) to load its probes: "
            "run it with sudo or as the systemd service"
        )
    if not (tracefs / "events").is_dir():
        try:
            tracefs.mkdir(parents=True, exist_ok=True)
            rc = subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracefs)],
                                capture_output=True).returncode
        except OSError:
            rc = -1
        if rc != 0 or not (tracefs / "events").is_dir():
            raise EnvironmentProblem(
                f"tracefs is not mounted at {tracefs} and mounting it failed: run "
                f"`mount -t tracefs nodev {tracefs}` (or `make setup`)"
            )
    release = platform.release()
    build = modules / release / "build"
    if not (build / "include").is_dir() and not Path("/sys/kernel/kheaders.tar.xz").exists():
        raise EnvironmentProblem(
            f"no kernel headers for {release} at {build}: run `make setup`, which installs "
            f"linux-headers-{release} or the nearest Debian headers and links them there"
        )
    try:
        import bcc  # noqa: F401
    except ImportError as e:
        raise EnvironmentProblem(
            f"BCC's Python bindings are not importable ({e}): install them with "
            "`apt-get install python3-bpfcc` and use a venv made with "
            "`/usr/bin/python3 -m venv --system-site-packages` (or run `make setup`)"
        ) from None
