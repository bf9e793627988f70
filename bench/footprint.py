"""Footprint: the monitor's memory, CPU and BPF map memory while 50 agents do ordinary work
(issue goals: RSS <= 80 MiB, CPU <= 2 % of one core).

Starts `agentwatch run` with the default policy (from a copy of monitor/ and probes/, as
bench/run.py does; own control socket and metrics port), measures it idle, then starts 50
agents with `agentwatch exec`, each a bash loop that every 0.5-0.9 s runs what an agent's
tool calls run: `git --version`, `git status` in a small repo, `ls -la`, `cat` of a file,
`/usr/bin/python3 -c pass` (every other round) and a TCP connect to a port this script
listens on at 127.0.0.1 (bash's /dev/tcp). After they have all started it measures for a
fixed time (60 s, `--quick` 15 s):
  * monitor RSS (VmRSS, VmHWM, RssAnon/RssFile from /proc/PID/status) idle and at the end,
    sampled every second in between, and where it is (smaps: LLVM/clang, libbcc, Python,
    other libraries, heap and anonymous memory, mmapped BPF ring buffer);
  * a baseline: a Python process that only imports the monitor's modules and BCC (no probes
    compiled), so idle RSS splits into "imports", "compiling and loading the probes" (BCC's
    in-process clang/LLVM) and the monitor's own growth under the agents;
  * monitor CPU, % of one core (utime + stime from /proc/PID/stat over the window);
  * events per second it handled and lost (the `status` counters);
  * BPF map memory: every BPF map fd the monitor holds (/proc/PID/fdinfo: map_type,
    max_entries, memlock), summed, the biggest by name (names from `bpftool map show -j`
    when bpftool is installed; otherwise map ids only).

Usage (needs root; wrap in the shared bench lock so runs do not overlap):
  flock /tmp/agentwatch-bench.lock .venv/bin/python bench/footprint.py [--quick]
Writes bench/results-footprint.json. Only 127.0.0.1 is contacted; every process started
here is stopped by pid (its own process group) in `finally`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from lib.harness import AwMonitor, Sources, bpf_holders, idle_cpu_pct, log, tree_cpu
from lib.load import BUSY_LIMIT, OtherLoad, quiet_host
from lib.machine import headline, machine, save_results
from lib.procs import Group, exit_on_signal, stop_groups, wait_for

BENCH = Path(__file__).resolve().parent
RSS_GOAL_MIB = 80
CPU_GOAL_PCT = 2.0

# One agent: ordinary tool use every 0.5-0.9 s. $1 = work dir, $2 = port to connect to.
AGENT_SCRIPT = r"""
unset PYTHONPATH AGENTWATCH_PROBES
work=$1; port=$2; i=0
while :; do
    /usr/bin/git --version >/dev/null
    /usr/bin/git -C "$work/repo" status --short >/dev/null
    /bin/ls -la "$work" >/dev/null
    /bin/cat "$work/notes.txt" >/dev/null
    if (( i % 2 == 0 )); then /usr/bin/python3 -c pass; fi
    if exec 3<>"/dev/tcp/127.0.0.1/$port"; then exec 3>&-; fi
    i=$((i + 1))
    /bin/sleep "0.$(( 5 + RANDOM % 5 ))"
done
"""

MAP_TYPES = {1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array",
             5: "percpu_hash", 6: "percpu_array", 9: "lru_hash", 11: "lpm_trie",
             27: "ringbuf"}


def fdinfo_objects(pid: int, kind: str) -> list[dict[str, Any]]:
    """The BPF maps (kind "map") or programs ("prog") pid holds: their fdinfo, one per id."""
    seen: dict[int, dict[str, Any]] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != f"anon_inode:bpf-{kind}":
                continue
            text = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:
            continue
        info: dict[str, Any] = {}
        for line in text.splitlines():
            key, _, value = line.partition(":")
            value = value.strip()
            info[key] = int(value) if value.isdigit() else value
        oid = info.get(f"{kind}_id", -int(fd.name))
        seen.setdefault(int(oid), info)
    return list(seen.values())


def bpftool_maps() -> dict[int, dict[str, Any]] | None:
    """`bpftool map show -j` by map id, or None without bpftool."""
    tool = shutil.which("bpftool")
    if tool is None:
        return None
    res = subprocess.run([tool, "map", "show", "-j"], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        return None
    try:
        return {int(m["id"]): m for m in json.loads(res.stdout)}
    except (ValueError, KeyError, TypeError):
        return None


def bpf_memory(pid: int) -> dict[str, Any]:
    """Memory of the BPF maps and programs pid holds (memlock: what the kernel charges)."""
    maps = fdinfo_objects(pid, "map")
    named = bpftool_maps()
    rows = []
    for m in maps:
        mid = m.get("map_id")
        tool = named.get(mid, {}) if named and isinstance(mid, int) else {}
        mtype = m.get("map_type")
        rows.append({"id": mid, "name": tool.get("name", f"id {mid}"),
                     "type": tool.get("type", MAP_TYPES.get(mtype, mtype)
                                      if isinstance(mtype, int) else mtype),
                     "max_entries": m.get("max_entries"),
                     "key_size": m.get("key_size"), "value_size": m.get("value_size"),
                     "memlock": int(m.get("memlock", 0))})
    rows.sort(key=lambda r: r["memlock"], reverse=True)
    progs = fdinfo_objects(pid, "prog")
    return {"maps": len(rows), "map_memlock_bytes": sum(r["memlock"] for r in rows),
            "programs": len(progs),
            "prog_memlock_bytes": sum(int(p.get("memlock", 0)) for p in progs),
            "names_from": "bpftool" if named is not None else "fdinfo (no names)",
            "by_map": rows}


def smaps_split(pid: int) -> dict[str, dict[str, float]]:
    """Resident MiB of pid by what is mapped (from /proc/PID/smaps): {"rss": {...}, "pss":
    {...}}. PSS counts a page mapped twice once: the BPF ring buffer's data pages are mapped
    twice in a row (so records can wrap), and RSS counts them twice."""
    out: dict[str, dict[str, int]] = {"Rss:": {}, "Pss:": {}}
    where = "anonymous"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(None, 1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line
            parts = line.split(None, 5)
            path = parts[5].strip() if len(parts) > 5 else ""
            low = path.lower()
            if "llvm" in low or "clang" in low:
                where = "LLVM + clang libraries"
            elif "libbcc" in low:
                where = "libbcc"
            elif "bpf" in low and path.startswith("anon_inode"):
                where = "BPF maps mmapped (ring buffer)"
            elif "python" in low:
                where = "Python interpreter + extension modules"
            elif ".so" in low:
                where = "other shared libraries"
            elif path == "[heap]" or not path:
                where = "heap + anonymous (Python objects, malloc: incl. clang/LLVM's)"
            else:
                where = "other (" + path.split("/")[-1][:30] + ")" if path.startswith("/") \
                    else f"other {path}"
        elif first in out:
            out[first][where] = out[first].get(where, 0) + int(line.split()[1])
    return {key[:3].lower(): {k: round(v / 1024, 1)
                              for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
            for key, d in out.items()}


def baseline_imports(src: Sources) -> dict[str, Any]:
    """RSS of a Python that only imports BCC and the monitor's modules (no probes compiled,
    no BPF): the part of the monitor's RSS that is interpreter and libraries."""
    code = ("import importlib, json\n"
            "mods = []\n"
            "for m in ('bcc', 'monitor.cli.main', 'monitor.service.daemon',\n"
            "          'monitor.kernel.loader', 'monitor.observe.collector',\n"
            "          'monitor.observe.alerts', 'monitor.policy.load'):\n"
            "    try:\n"
            "        importlib.import_module(m); mods.append(m)\n"
            "    except Exception:\n"
            "        pass\n"
            "st = {l.split(':')[0]: int(l.split()[1]) / 1024\n"
            "      for l in open('/proc/self/status') if l.startswith(('VmRSS', 'RssAnon',\n"
            "                                                           'RssFile'))}\n"
            "print(json.dumps({'imported': mods, **st}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=src.env, cwd=src.dir, check=False)
    try:
        return {k: round(v, 1) if isinstance(v, float) else v
                for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}
    except (ValueError, IndexError):
        return {"error": res.stderr.strip()[-500:]}


class Listener:
    """A 127.0.0.1 TCP port that accepts and closes every connection (the agents' service)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()
            self.accepted += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def make_workdir(tmp: Path) -> Path:
    """work/notes.txt, work/file*.py, and a git repo of them in work/repo."""
    work = tmp / "work"
    (work / "repo").mkdir(parents=True)
    for d in (work, work / "repo"):
        (d / "notes.txt").write_text("TODO: fix the flaky test\n" * 200)
        for i in range(20):
            (d / f"file{i:02d}.py").write_text(f"print({i})\n")
    genv = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp)}
    for args in (["init", "-q"], ["add", "."],
                 ["-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm",
                  "init"]):
        subprocess.run(["git", "-C", str(work / "repo"), *args], check=True, env=genv,
                       capture_output=True)
    (work / "repo" / "README").write_text("bench\n")
    return work


def sessions_sum(status: dict[str, Any], key: str) -> int:
    return sum(int(s.get(key, 0)) for s in status["sessions"] if s["agent"].startswith("agent-"))


def footprint(src: Sources, tmp: Path, agents: int, seconds: float, idle_s: float
              ) -> dict[str, Any]:
    mon = AwMonitor(tmp / "monitor", src)
    work = make_workdir(tmp)
    listener = Listener()
    groups: list[Group] = []
    res: dict[str, Any] = {"agents": agents, "seconds": seconds}
    try:
        res["waited_for_quiet_s"] = round(quiet_host(30), 1)
        res["baseline_imports_mib"] = baseline_imports(src)
        res["monitor_start_s"] = round(mon.start(), 2)
        res["monitor_started"] = mon.started_line()
        time.sleep(2.0)
        idle_cpu = idle_cpu_pct(mon, idle_s)  # schedstat: a few ticks is too coarse
        res["idle"] = {"cpu_pct": round(idle_cpu, 2), "seconds": idle_s,
                       "memory_mib": mon.memory(), "smaps_mib": smaps_split(mon.pid),
                       "bpf": bpf_memory(mon.pid)}
        log(f"idle: RSS {res['idle']['memory_mib']['VmRSS']} MiB, CPU {idle_cpu:.2f}% "
            f"(baseline imports {res['baseline_imports_mib'].get('VmRSS')} MiB)")

        log(f"starting {agents} agents")
        t_agents = time.monotonic()
        for i in range(agents):
            groups.append(Group(
                [*mon.exec_prefix(f"agent-{i:02d}"), "/bin/bash", "-c", AGENT_SCRIPT,
                 f"agent-{i:02d}", str(work), str(listener.port)],
                src, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        wait_for(f"{agents} agent sessions",
                       lambda: sum(s["agent"].startswith("agent-")
                                   for s in mon.status()["sessions"]) >= agents, 120)
        res["agents_start_s"] = round(time.monotonic() - t_agents, 1)
        time.sleep(2.0)  # every agent past its first round

        load = OtherLoad(lambda: [mon.pid, *(g.proc.pid for g in groups)], tree_cpu)
        load.start()
        foreign = set(bpf_holders(mon.pid))
        before, accepted0 = mon.status(), listener.accepted
        cpu0, t0 = mon.cpu_seconds(), time.monotonic()
        rss_samples = []
        log(f"measuring for {seconds:g} s")
        while time.monotonic() - t0 < seconds:
            time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
            rss_samples.append(mon.memory()["VmRSS"])
        cpu, window = mon.cpu_seconds() - cpu0, time.monotonic() - t0
        after = mon.status()
        others = load.cores()
        foreign.update(bpf_holders(mon.pid))
        events = after["events"] - before["events"]
        res["work"] = {
            "window_s": round(window, 2), "monitor_cpu_s": round(cpu, 2),
            "cpu_pct": round(100 * cpu / window, 2),
            "events": events, "events_per_s": round(events / window, 1),
            "lost": after["counters"]["lost"] - before["counters"]["lost"],
            "execs": sessions_sum(after, "execs") - sessions_sum(before, "execs"),
            "connects": sessions_sum(after, "connects") - sessions_sum(before, "connects"),
            "accepted_connections": listener.accepted - accepted0,
            "live_agent_processes": sum(s["processes"] for s in after["sessions"]
                                        if s["agent"].startswith("agent-")),
            "verdicts": after["verdicts"],
            "rss_mib_samples": rss_samples,
            "memory_mib": mon.memory(), "smaps_mib": smaps_split(mon.pid),
            "bpf": bpf_memory(mon.pid),
            "other_load_cores": round(others, 2), "foreign_bpf_pids": sorted(foreign),
            "disturbed": bool(foreign) or others > BUSY_LIMIT}
        w = res["work"]
        log(f"end: RSS {w['memory_mib']['VmRSS']} MiB (HWM {w['memory_mib']['VmHWM']}), CPU "
            f"{w['cpu_pct']}%, {w['events_per_s']} events/s, lost {w['lost']}")
        stopping, groups = groups, []
        stop_groups(stopping)
        time.sleep(2.0)
        res["after_agents_stopped"] = {"memory_mib": mon.memory()}
    finally:
        stop_groups(groups)
        mon.stop()
        listener.close()
    return res


def mib(b: int) -> float:
    return b / 2**20


def anon_file(mem: dict[str, float]) -> str:
    return f"{mem.get('RssAnon', 0):.0f} / {mem.get('RssFile', 0):.0f}"


def report(res: dict[str, Any]) -> str:
    m, f = res["machine"], res["footprint"]
    idle, w = f["idle"], f["work"]
    im, wm = idle["memory_mib"], w["memory_mib"]
    base = f["baseline_imports_mib"].get("VmRSS")
    rss_max = max([im["VmRSS"], wm["VmRSS"], *w["rss_mib_samples"]])
    rss_ok = rss_max <= RSS_GOAL_MIB
    cpu_ok = w["cpu_pct"] <= CPU_GOAL_PCT
    events = f"{w['events_per_s']:.0f} ({w['lost']})"
    agents = f"{f['agents']} agents"
    out = headline(m, "agentwatch footprint bench", commit=True)
    out += ["", f"{f['agents']} agents of ordinary tool use for {w['window_s']:.0f} s "
                f"(git, ls, cat, python3 -c pass, a loopback connect every 0.5-0.9 s each); "
                "default policy",
            f"  {'':<34}{'idle':>10}{agents:>12}   goal",
            f"  {'VmRSS, MiB':<34}{im['VmRSS']:>10.1f}{wm['VmRSS']:>12.1f}   <= {RSS_GOAL_MIB}: "
            f"{'met' if rss_ok else 'NOT met'}",
            f"  {'VmHWM (peak since start), MiB':<34}{im['VmHWM']:>10.1f}{wm['VmHWM']:>12.1f}"
            + ("   (the peak is the probe compile at start-up)"
               if wm["VmHWM"] > rss_max + 1 else ""),
            f"  {'PSS (each page once), MiB':<34}{im.get('Pss', 0):>10.1f}{wm.get('Pss', 0):>12.1f}"
            "   (RSS counts the ring buffer's pages twice)",
            f"  {'RssAnon / RssFile, MiB':<34}{anon_file(im):>10}{anon_file(wm):>12}",
            f"  {'monitor CPU, % of one core':<34}{idle['cpu_pct']:>10.2f}{w['cpu_pct']:>12.2f}"
            f"   <= {CPU_GOAL_PCT:g}: {'met' if cpu_ok else 'NOT met'}",
            f"  {'events/s handled (lost)':<34}{'-':>10}{events:>12}",
            f"  work done in the window: {w['execs']} execs, {w['connects']} connects "
            f"({w['accepted_connections']} accepted by the listener); "
            f"{w['live_agent_processes']} live agent processes at the end",
            f"  RSS over the window: min {min(w['rss_mib_samples']):.1f}, max "
            f"{max(w['rss_mib_samples']):.1f} MiB; after the agents were stopped: "
            f"{f['after_agents_stopped']['memory_mib']['VmRSS']:.1f} MiB",
            "", "Where the RSS is:"]
    if isinstance(base, float):
        bfile = f["baseline_imports_mib"].get("RssFile")
        out.append(f"  a Python that only imports BCC and the monitor's modules (nothing "
                   f"compiled, no BPF): {base:.1f} MiB"
                   + (f" (file-backed {bfile:.1f}: libLLVM/libclang-cpp are mapped and "
                      "relocated by the import)" if isinstance(bfile, float) else ""))
        out.append(f"  the idle monitor (probes compiled by BCC's in-process clang/LLVM and "
                   f"loaded, policy, metrics): {im['VmRSS']:.1f} MiB ({im['VmRSS'] - base:+.1f} "
                   f"against imports only); start-up peak (VmHWM) {im['VmHWM']:.1f} MiB")
    out.append(f"  the monitor's own growth with {f['agents']} agents: "
               f"{wm['VmRSS'] - im['VmRSS']:+.1f} MiB -> {wm['VmRSS']:.1f} MiB; PSS (each page "
               f"once) {wm.get('Pss', 0):.1f} MiB")
    i_rss, w_rss, w_pss = idle["smaps_mib"]["rss"], w["smaps_mib"]["rss"], w["smaps_mib"]["pss"]
    out.append(f"  {'by mapping (smaps), MiB':<66}{'RSS idle':>9}{'RSS end':>9}{'PSS end':>9}")
    for k in dict.fromkeys([*w_rss, *i_rss]):
        if max(i_rss.get(k, 0), w_rss.get(k, 0)) < 0.5:
            continue
        out.append(f"    {k:<64}{i_rss.get(k, 0):>9.1f}{w_rss.get(k, 0):>9.1f}"
                   f"{w_pss.get(k, 0):>9.1f}")
    out.append(f"    (smaller mappings: {sum(v for v in w_rss.values() if v < 0.5):.1f} MiB; "
               "PSS counts the ring buffer's doubly mapped pages once)")
    b = w["bpf"]
    out += ["", f"BPF memory (kernel, not in RSS unless mmapped): {b['maps']} maps, memlock "
                f"{mib(b['map_memlock_bytes']):.1f} MiB; {b['programs']} programs, "
                f"{mib(b['prog_memlock_bytes']):.2f} MiB (names: {b['names_from']})",
            f"  {'map':<20}{'type':<16}{'max_entries':>12}{'memlock MiB':>13}"]
    for r in b["by_map"][:8]:
        out.append(f"  {str(r['name']):<20}{str(r['type']):<16}{r['max_entries']!s:>12}"
                   f"{mib(r['memlock']):>13.2f}")
    if len(b["by_map"]) > 8:
        rest = sum(r["memlock"] for r in b["by_map"][8:])
        more = f"{len(b['by_map']) - 8} more"
        out.append(f"  {more:<48}{mib(rest):>13.2f}")
    out.append(f"\ngoals: RSS <= {RSS_GOAL_MIB} MiB (highest VmRSS seen: {rss_max:.1f}): "
               f"{rss_ok}; CPU <= {CPU_GOAL_PCT:g} % of one core: {cpu_ok}")
    if w["disturbed"]:
        out.append(f"WARNING: disturbed: other work used {w['other_load_cores']} cores or other "
                   f"BPF users {w['foreign_bpf_pids']} were present during the window")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="15 s of work instead of 60")
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--seconds", type=float, help="work period (default 60, quick 15)")
    ap.add_argument("--output", default=str(BENCH / "results-footprint.json"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("footprint: needs root (the monitor loads BPF probes)", file=sys.stderr)
        return 3
    exit_on_signal()
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    idle_s = 5.0 if args.quick else 10.0
    res: dict[str, Any] = {"machine": machine(), "params": {
        "quick": args.quick, "agents": args.agents, "seconds": seconds, "idle_s": idle_s,
        "agent_script": AGENT_SCRIPT,
        "goals": {"rss_mib": RSS_GOAL_MIB, "cpu_pct_of_one_core": CPU_GOAL_PCT}}}
    if res["machine"]["other_monitors"]:
        log(f"WARNING: other agentwatch monitors are running: {res['machine']['other_monitors']}")
    t_start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="agentwatch-footprint-"))
    try:
        src = Sources(tmp)
        res["machine"]["sources_sha256"] = src.sha256
        res["footprint"] = footprint(src, tmp, args.agents, seconds, idle_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    f = res["footprint"]
    w = f["work"]
    rss_max = max([f["idle"]["memory_mib"]["VmRSS"], w["memory_mib"]["VmRSS"],
                   *w["rss_mib_samples"]])
    res["goals"] = {"rss_le_80mib": rss_max <= RSS_GOAL_MIB, "rss_max_mib": rss_max,
                    "peak_vmhwm_le_80mib": w["memory_mib"]["VmHWM"] <= RSS_GOAL_MIB,
                    "cpu_le_2pct": w["cpu_pct"] <= CPU_GOAL_PCT}
    save_results(res, args.output, report(res), t_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
