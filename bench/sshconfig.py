"""Per-exec cost of resolving an agent's ssh config (monitor/sessions/sshconfig.py).

Each round hands SshConfigStep.resolve an ssh exec of a tracked process and reports
microseconds per exec: reading the process's view (/proc/PID cwd, environ, status, its
/etc/passwd), the files ssh would read (through openat2 inside the process's root), and
the resolution (monitor/policy/sshconfig.py), on the worker thread whose wait is bounded.
Cases: no user config (the system file only), a typical ~/.ssh/config (fifteen hosts, ~80
lines), the same split over five Included files, the typical one without the worker thread,
and its pure resolution with the files already in memory. The process view is a /proc
fixture whose root is this machine's /, so the real /etc/ssh/ssh_config and its Includes
are read too. No root, no BPF.

    .venv/bin/python bench/sshconfig.py [--execs 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from monitor.model.events import ExecEvent, Header  # noqa: E402
from monitor.policy.sshargs import parse_ssh_argv  # noqa: E402
from monitor.policy.sshconfig import resolve  # noqa: E402
from monitor.sessions.sshconfig import SshConfigStep  # noqa: E402

PID = 4242


def typical(hosts: range) -> str:
    blocks = []
    for i in hosts:
        blocks.append(f"Host box{i} box{i}.internal\n  HostName 10.0.0.{i}\n  User dev\n"
                      f"  IdentityFile ~/.ssh/id_ed25519\n  LocalForward {8000 + i} "
                      "localhost:80\n")
    return "".join(blocks) + "Host *\n  ServerAliveInterval 30\n  AddKeysToAgent yes\n"


def fixture(base: Path, *, user_config: str | None, includes: bool) -> Path:
    home = base / "home"
    (home / ".ssh" / "conf.d").mkdir(parents=True)
    if user_config is not None and includes:
        (home / ".ssh" / "config").write_text("Include conf.d/*.conf\n")
        for part in range(5):
            (home / ".ssh" / "conf.d" / f"{part}.conf").write_text(
                typical(range(part * 3, part * 3 + 3)))
    elif user_config is not None:
        (home / ".ssh" / "config").write_text(user_config)
    proc = base / "proc" / str(PID)
    proc.mkdir(parents=True)
    os.symlink("/", proc / "root")
    os.symlink(str(base), proc / "cwd")
    (proc / "environ").write_bytes(b"PATH=/usr/bin\0HOME=" + str(home).encode() + b"\0")
    uid = os.getuid()
    (proc / "status").write_text(f"Name:\tssh\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    return base / "proc"


def per_exec_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--execs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    ev = ExecEvent(Header(1, PID, PID, 7, 1, os.getuid(), "ssh"), 0, 1, 0, 0, "/usr/bin/ssh",
                   ("ssh", "box3", "uptime"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cases: dict[str, Callable[[], object]] = {}
        for name, text, inc in (("system-only", None, False), ("typical", typical(range(15)),
                                                               False),
                                ("includes", "", True)):
            step = SshConfigStep(fixture(Path(tmp) / name, user_config=text, includes=inc))
            cases[name] = lambda step=step: step.resolve(ev, needed=True)
            if name == "typical":  # the same without the worker thread that bounds the wait
                cases["typical-inline"] = lambda step=step: step.config_for(ev)
        texts = {"/u/.ssh/config": typical(range(15))}

        class Memory:
            def read(self, path: str) -> str | None:
                return texts.get(path)

            def glob(self, pattern: str) -> list[str]:
                return []

            def absolute(self, path: str) -> str:
                return path

        request = parse_ssh_argv(ev.argv)
        cases["pure-typical"] = lambda: resolve(request, Memory(),
                                                user_configs=["/u/.ssh/config"],
                                                local_user="dev")
        found: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                found[name].append(per_exec_us(fn, args.execs))
        for name, runs in found.items():
            rows.append(f"{name:<14} {statistics.median(runs):9.1f} "
                        f"{min(runs):9.1f} {max(runs):9.1f}")
    print(f"{'case':<14} {'median_us':>9} {'min_us':>9} {'max_us':>9}")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
