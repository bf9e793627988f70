"""The `agentwatch` command line: run, trace, exec, status, top, killswitch, reload, and
the parser for every command (policy check/test and config check are in cli/files.py).

Turns every AgentwatchError into one sentence on stderr and its exit code (2 bad config,
3 host lacks something, 4 control socket refused); never prints a traceback for those.
Text that may come from an agent reaches the terminal only through monitor.model.safetext
(or as JSON, which escapes it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

from monitor import __version__
from monitor.cli.files import cmd_config_check, cmd_policy_check, cmd_policy_test
from monitor.config.load import default_config, load_config
from monitor.config.types import Config
from monitor.kernel.loader import ProbeOptions, Probes
from monitor.model.errors import AgentwatchError, ConfigError, ControlError
from monitor.model.events import Event
from monitor.model.safetext import printable
from monitor.observe.output import HEADER, columns, columns_of, record, to_json
from monitor.policy.load import default_policy, load_policy
from monitor.policy.types import Policy
from monitor.service import client

DEFAULT_SOCKET = "/run/agentwatch/control.sock"

EPILOG_RUN = """examples:
  agentwatch run                         # embedded default config and policy; JSON log lines
  agentwatch run --policy my-policy.yaml # check it first: agentwatch policy check FILE
  agentwatch run --config /etc/agentwatch/config.yaml --verbose
"""
EPILOG_TRACE = """examples:
  agentwatch trace                       # agent events, from the running monitor if there is one
  agentwatch trace --json                # one JSON object per line
  agentwatch trace --all                 # every process on the host (loads its own probes)
  agentwatch trace --record events.jsonl # also record events to a file
"""
EPILOG_TOP = """examples:
  agentwatch top                         # live view, redrawn every second; Ctrl-C quits
  agentwatch top --interval 2            # poll the monitor every 2 seconds
  agentwatch top --once                  # one frame on the normal screen (rates over 1 s)
  agentwatch top --once --interval 0     # one frame from a single snapshot, at once
"""
EPILOG_EXEC = """examples:
  agentwatch exec --agent ci-bot -- ./run-agent.sh --task 42
  agentwatch exec --agent claude -- claude -p "fix the tests"
The command is tracked as an agent root by the running monitor before its first instruction.
"""


def _as_root() -> bool:
    """As root, config and policy files an agent could have edited are refused (read
    through a trusted path only: monitor/config/safefile.py)."""
    return os.geteuid() == 0


def _load(path: str | None) -> Config:
    return load_config(path, trusted=_as_root()) if path else default_config()


def _policy(path: str | None, default: Callable[[], Policy] | None) -> tuple[Policy | None,
                                                                              float]:
    """The policy (from the file, else the default) and how long loading it took."""
    start = time.monotonic()
    policy = load_policy(path, trusted=_as_root()) if path else (
        default() if default else None)
    return policy, time.monotonic() - start


def _socket(args: argparse.Namespace, cfg: Config | None = None) -> str:
    if args.socket:
        return str(args.socket)
    return cfg.monitor.control_socket if cfg else DEFAULT_SOCKET


def _stop_on_signals(reload: threading.Event | None = None) -> threading.Event:
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if reload is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reload.set())
    return stop


def _run_monitor(cfg: Config, loaded: tuple[Policy | None, float], sock: str | None,
                 sink: Callable[[Event, str], None] | None, trace_all: bool = False,
                 log: Callable[..., None] | None = None, serve_metrics: bool = False,
                 reloader: Callable[[], tuple[Config, Policy]] | None = None) -> int:
    from prometheus_client import CollectorRegistry

    from monitor.observe.collector import AgentwatchCollector, serve
    from monitor.service.daemon import Monitor

    policy, load_seconds = loaded
    probes = Probes(ProbeOptions(max_procs=cfg.monitor.max_processes,
                                 ringbuf_mib=cfg.monitor.ring_buffer_mib, trace_all=trace_all,
                                 pin_dir="" if trace_all else cfg.monitor.pin_dir))
    mon = Monitor(cfg, policy, probes=probes, sink=sink, control_path=sock, log=log)
    mon.metrics.observe_policy_loaded(load_seconds)
    mon.reloads.loader = reloader
    stop = _stop_on_signals(mon.reload_requested if reloader else None)
    server = None
    mon.start()
    try:
        if serve_metrics:
            registry = CollectorRegistry()
            registry.register(AgentwatchCollector(mon.report))
            server, _ = serve(registry, cfg.metrics.listen,
                              cache_seconds=cfg.metrics.cache_seconds,
                              max_per_second=cfg.metrics.max_scrapes_per_second, log=mon.log)
            mon.log("metrics served", address=cfg.metrics.listen)
        mon.run(stop)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        mon.stop()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)

    def reloader() -> tuple[Config, Policy]:
        config = _load(args.config)
        policy = _policy(args.policy, default_policy)[0]
        assert policy is not None
        return config, policy

    sink = None
    if args.verbose:
        def sink(ev: Event, agent: str) -> None:
            print(json.dumps({"msg": "event", **record(ev, agent)}), flush=True)
    return _run_monitor(cfg, _policy(args.policy, default_policy), _socket(args, cfg), sink,
                        serve_metrics=True, reloader=reloader)


def _printer(as_json: bool, out: IO[str], rec: IO[str] | None
             ) -> Callable[[Event, str], None]:
    def sink(ev: Event, agent: str) -> None:
        out.write((to_json(ev, agent) if as_json else columns(ev, agent)) + "\n")
        out.flush()
        if rec is not None:
            rec.write(to_json(ev, agent) + "\n")
    return sink


def cmd_trace(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    sock = _socket(args, cfg)
    rec = open(args.record, "a", encoding="utf-8") if args.record else None  # noqa: SIM115
    try:
        if not args.all:
            try:
                stream = client.stream(sock)
            except ControlError:
                stream = None
            if stream is not None:
                print(f"# streaming from the monitor on {sock}", file=sys.stderr)
                if not args.json:
                    print(HEADER, flush=True)
                for item in stream:
                    _print_record(item, args.json, rec)
                return 0
        if not args.json:
            print(HEADER, flush=True)
        serve = None if args.all else sock
        quiet = _quiet_log
        return _run_monitor(cfg, _policy(args.policy, None), serve,
                            _printer(args.json, sys.stdout, rec), trace_all=args.all, log=quiet)
    finally:
        if rec is not None:
            rec.close()


def _quiet_log(msg: str, level: str = "info", **fields: object) -> None:
    print(printable(f"# {msg} " + " ".join(f"{k}={v}" for k, v in fields.items())),
          file=sys.stderr)


def _print_record(item: dict[str, object], as_json: bool, rec: IO[str] | None) -> None:
    line = json.dumps(item, separators=(",", ":"))
    if rec is not None:
        rec.write(line + "\n")
    print(line if as_json else columns_of(item), flush=True)


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ControlError("nothing to run: give the command after `--`, e.g. "
                           "`agentwatch exec --agent bot -- ./agent.sh`")
    reply = client.request(_socket(args), {"op": "register", "agent": args.agent})
    if args.verbose:
        print(f"agentwatch: {argv[0]} runs as agent {args.agent!r}, session "
              f"{reply.get('session')}", file=sys.stderr)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"agentwatch exec: cannot run {argv[0]!r}: {e.strerror}", file=sys.stderr)
        return 127
    return 0  # not reached


def cmd_killswitch(args: argparse.Namespace) -> int:
    req: dict[str, object] = {"op": "killswitch", "latch": args.latch, "release": args.release}
    if args.agent:
        req["agent"] = args.agent
    reply = client.request(_socket(args), req, timeout=30)
    if args.release:
        print(printable(f"kill switch released for {reply.get('released')}; still latched: "
                        f"{', '.join(reply.get('latched') or []) or 'nothing'}"))
    else:
        print(printable(f"kill switch: {reply.get('sessions')} agent sessions, "
                        f"{reply.get('killed')} processes killed" +
                        (f"; latched: {', '.join(reply.get('latched') or [])}"
                         if args.latch else "")))
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    reply = client.request(_socket(args), {"op": "reload"}, timeout=30)
    print(f"policy reloaded: sha256 {reply.get('policy_sha256')}")
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    from monitor.service.install import install

    for line in install(args.prefix, force=args.force, dry_run=args.dry_run):
        print(line)
    return 0


def cmd_detach(args: argparse.Namespace) -> int:
    from monitor.kernel.pinning import detach

    pin_dir = args.pin_dir or _load(args.config).monitor.pin_dir
    if not pin_dir:
        print("nothing pinned: monitor.pin_dir is not set", file=sys.stderr)
        return 0
    removed = detach(pin_dir)
    print(f"detached: {len(removed)} pins removed under {pin_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    reply = client.request(_socket(args), {"op": "status"})
    reply.pop("ok", None)
    print(json.dumps(reply, indent=2))
    return 0


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (e.g. 0.5)")
    return value


def cmd_top(args: argparse.Namespace) -> int:
    from monitor.cli.top import run_top  # rich is imported by this command only

    return run_top(_socket(args), interval=args.interval, once=args.once)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agentwatch",
        description="Watch AI agents' process trees through eBPF: what they exec and where "
                    "they connect, per agent session.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit codes: 0 ok, 2 bad config, 3 host lacks BPF/headers/tracefs/root, "
               "4 control socket refused or unreachable.")
    p.add_argument("--version", action="version", version=f"agentwatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, helptext: str, epilog: str = "") -> argparse.ArgumentParser:
        return sub.add_parser(name, help=helptext, description=helptext, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    r = add("run", "run the monitor in the foreground", EPILOG_RUN)
    r.add_argument("--config", help="config file (default: the embedded default config)")
    r.add_argument("--policy", help="policy file (default: the embedded default policy)")
    r.add_argument("--socket", help=f"control socket path (default from config: {DEFAULT_SOCKET})")
    r.add_argument("--verbose", action="store_true", help="log every agent event too")
    r.set_defaults(func=cmd_run)

    t = add("trace", "print a live stream of agent events", EPILOG_TRACE)
    t.add_argument("--config", help="config file used when no monitor is running")
    t.add_argument("--socket", help="control socket of the running monitor")
    t.add_argument("--policy", help="when no monitor runs: enforce this policy too "
                   "(default: none, trace only)")
    t.add_argument("--json", action="store_true", help="JSON lines instead of columns")
    t.add_argument("--all", action="store_true",
                   help="include processes that are not agents (loads its own probes)")
    t.add_argument("--record", metavar="FILE", help="append every event as JSON to FILE")
    t.set_defaults(func=cmd_trace)

    e = add("exec", "run a command as a tracked agent root of the running monitor", EPILOG_EXEC)
    e.add_argument("--agent", required=True, help="agent name for the new session")
    e.add_argument("--socket", help="control socket of the running monitor")
    e.add_argument("--verbose", action="store_true", help="say which session was created")
    e.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    e.set_defaults(func=cmd_exec)

    k = add("killswitch", "kill every process of every (or one) agent now",
            "examples:\n  agentwatch killswitch                 # every agent, now\n"
            "  agentwatch killswitch --agent ci-bot  # one agent\n"
            "  agentwatch killswitch --latch         # and keep killing new agent processes\n"
            "  agentwatch killswitch --release       # stop latching\n"
            "Each use raises the kill-switch alert. It works in monitor mode too.")
    k.add_argument("--agent", help="only this agent (default: every agent)")
    group = k.add_mutually_exclusive_group()
    group.add_argument("--latch", action="store_true",
                       help="keep killing any new process of the agent(s) until --release")
    group.add_argument("--release", action="store_true", help="release a latched kill switch")
    k.add_argument("--socket", help="control socket of the running monitor")
    k.set_defaults(func=cmd_killswitch)

    rl = add("reload", "reload config and policy in the running monitor (like SIGHUP)")
    rl.add_argument("--socket", help="control socket of the running monitor")
    rl.set_defaults(func=cmd_reload)

    ins = add("install", "install the systemd unit, /etc/agentwatch/config.yaml and "
              "policy.yaml (never overwriting yours)",
              "examples:\n  agentwatch install              # then: systemctl enable --now "
              "agentwatch\n  agentwatch install --dry-run    # say what it would do\n"
              "  agentwatch install --force      # replace edited files (keeps .bak)")
    ins.add_argument("--prefix", default="/", help="install under this root (default /)")
    ins.add_argument("--force", action="store_true", help="replace edited files, keep .bak")
    ins.add_argument("--dry-run", action="store_true", help="only say what would be done")
    ins.set_defaults(func=cmd_install)

    d = add("detach", "remove the pinned probes that outlive the monitor (uninstall, or "
            "a deliberate stop)", "examples:\n  agentwatch detach --pin-dir /sys/fs/bpf/agentwatch")
    d.add_argument("--pin-dir", help="bpffs directory (default: monitor.pin_dir of --config)")
    d.add_argument("--config", help="config file whose monitor.pin_dir to use")
    d.set_defaults(func=cmd_detach)

    s = add("status", "show the running monitor's probes, agents and counters")
    s.add_argument("--socket", help="control socket of the running monitor")
    s.set_defaults(func=cmd_status)

    tp = add("top", "live view of agent sessions, verdicts and connections", EPILOG_TOP)
    tp.add_argument("--socket", help="control socket of the running monitor")
    tp.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS",
                    help="seconds between status polls (default 1); with --once, the "
                    "sample for CPU and event rates (0: one snapshot, no rates)")
    tp.add_argument("--once", action="store_true",
                    help="print one frame on the normal screen and exit (for scripts)")
    tp.set_defaults(func=cmd_top)

    pol = add("policy", "work with policy files")
    psub = pol.add_subparsers(dest="policy_command", required=True)
    pc = psub.add_parser("check", help="validate a policy: exit 0 with a summary, or 2 with "
                         "every error (file:line: key: reason)")
    pc.add_argument("file")
    pc.set_defaults(func=cmd_policy_check)
    pt = psub.add_parser("test", help="replay recorded events (trace --record) against a "
                         "policy and print what would have been killed, and why",
                         epilog="example:\n  agentwatch trace --record /tmp/ev.jsonl\n"
                         "  agentwatch policy test my-policy.yaml --events /tmp/ev.jsonl",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    pt.add_argument("file", help="policy file, or `default` for the embedded policy")
    pt.add_argument("--events", required=True, metavar="RECORDING")
    pt.set_defaults(func=cmd_policy_test)

    c = add("config", "work with config files")
    csub = c.add_subparsers(dest="config_command", required=True)
    cc = csub.add_parser("check", help="validate a config file: exit 0, or 2 with every error")
    cc.add_argument("file")
    cc.set_defaults(func=cmd_config_check)
    return p


def _error_text(e: AgentwatchError) -> str:
    """The error for a terminal: a config error one line per problem, any other one line;
    the text escaped, for it may quote an agent's (a recording's, a reply's) strings."""
    if isinstance(e, ConfigError) and e.problems:  # values in them are quoted with repr()
        return "\n".join(printable(f"agentwatch: {loc}: {reason}" if i == 0 else
                                    f"{loc}: {reason}", backslash=False)
                         for i, (loc, reason) in enumerate(e.problems))
    return printable(f"agentwatch: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AgentwatchError as e:
        print(_error_text(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
