"""The records the control socket speaks: one definition for who writes them and who reads.

Event records are what `trace --json`, `--record` files and the monitor's event stream
carry, one JSON object per event (monitor/observe/output.py makes them from typed events;
`agentwatch top` and `trace` read them back); a PolicyVerdictRecord is the judge's verdict
line as the stream carries it; a StatusReply is the answer to the `status` request. Each
is a frozen dataclass with `to_json()` (the exact dict that goes on the wire, keys in the
documented order) and `from_json()` (lenient: a missing or mistyped field reads as its
default, as a record from an older or newer monitor may lack one; never raises on a
dict). Nothing here does I/O or imports anything of the monitor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from monitor.model.outcome import Outcome

Json = dict[str, Any]


def _number(d: Mapping[str, Any], key: str, kind: type[int] | type[float],
            default: float) -> Any:
    """d[key] as kind, or default when it is missing or no number (a bool is none)."""
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return default
    try:
        return kind(value)
    except ValueError:
        return default


def _int(d: Mapping[str, Any], key: str, default: int = 0) -> int:
    return int(_number(d, key, int, default))


def _opt_int(d: Mapping[str, Any], key: str) -> int | None:
    return None if d.get(key) is None else _int(d, key)


def _float(d: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    return float(_number(d, key, float, default))


def _str(d: Mapping[str, Any], key: str, default: str = "") -> str:
    value = d.get(key)
    return default if value is None else str(value)


def _opt_str(d: Mapping[str, Any], key: str) -> str | None:
    value = d.get(key)
    return None if value is None else str(value)


def _strs(d: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = d.get(key)
    return tuple(str(v) for v in value) if isinstance(value, list | tuple) else ()


# --- the event stream ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EventRecord:
    """What every event record has: when, whose (agent name or None), which process."""

    EVENT: ClassVar[str] = ""
    ts_ns: int = 0
    agent: str | None = None
    session: int = 0
    pid: int = 0
    tid: int = 0
    uid: int = 0
    comm: str = ""

    def to_json(self) -> Json:
        return {"ts_ns": self.ts_ns, "event": self.EVENT, "agent": self.agent,
                "session": self.session, "pid": self.pid, "tid": self.tid, "uid": self.uid,
                "comm": self.comm, **self._body()}

    def _body(self) -> Json:
        return {}

    @staticmethod
    def _head(d: Mapping[str, Any]) -> Json:
        return {"ts_ns": _int(d, "ts_ns"), "agent": _opt_str(d, "agent") or None,
                "session": _int(d, "session"), "pid": _int(d, "pid"), "tid": _int(d, "tid"),
                "uid": _int(d, "uid"), "comm": _str(d, "comm")}


@dataclass(frozen=True, kw_only=True)
class ExecRecord(EventRecord):
    EVENT: ClassVar[str] = "exec"
    filename: str = ""
    argv: tuple[str, ...] = ()
    ppid: int = 0
    argv_truncated: bool = False
    flags: tuple[str, ...] = ()  # ExecFlag names, lower case ("new_root", ...)
    loader: str | None = None  # the interpreter that runs filename (a key only when set)
    sha256: str | None = None  # the executable's content, when it was fingerprinted
    fileless: bool = False  # memfd, deleted or O_TMPFILE executable

    def _body(self) -> Json:
        loader = {"loader": self.loader} if self.loader is not None else {}
        return {"filename": self.filename, "argv": list(self.argv), "ppid": self.ppid,
                "argv_truncated": self.argv_truncated, "flags": list(self.flags),
                "sha256": self.sha256, "fileless": self.fileless, **loader}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ExecRecord:
        return cls(**cls._head(d), filename=_str(d, "filename"), argv=_strs(d, "argv"),
                   ppid=_int(d, "ppid"), argv_truncated=bool(d.get("argv_truncated")),
                   flags=_strs(d, "flags"), loader=_opt_str(d, "loader"),
                   sha256=_opt_str(d, "sha256") or None, fileless=bool(d.get("fileless")))


@dataclass(frozen=True, kw_only=True)
class ConnectRecord(EventRecord):
    EVENT: ClassVar[str] = "connect"
    family: str = "ipv4"  # "ipv4" or "ipv6"
    address: str = ""
    port: int = 0
    protocol: str = ""  # "tcp", "udp", or the IPPROTO number
    send: bool = False  # a UDP datagram sent with this destination, not a connect

    def _body(self) -> Json:
        return {"family": self.family, "address": self.address, "port": self.port,
                "protocol": self.protocol, "send": self.send}

    @property
    def destination(self) -> str:
        """HOST:PORT, an IPv6 host in brackets."""
        host = f"[{self.address}]" if self.family == "ipv6" else self.address
        return f"{host}:{self.port}"

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ConnectRecord:
        return cls(**cls._head(d), family=_str(d, "family", "ipv4"),
                   address=_str(d, "address"), port=_int(d, "port"),
                   protocol=_str(d, "protocol"), send=d.get("send") is True)


@dataclass(frozen=True, kw_only=True)
class ForkRecord(EventRecord):
    EVENT: ClassVar[str] = "fork"
    child_pid: int = 0

    def _body(self) -> Json:
        return {"child_pid": self.child_pid}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ForkRecord:
        return cls(**cls._head(d), child_pid=_int(d, "child_pid"))


@dataclass(frozen=True, kw_only=True)
class KernelVerdictRecord(EventRecord):
    """A rule the probes matched (and enforced, unless in monitor mode)."""

    EVENT: ClassVar[str] = "verdict"
    rule: int = 0
    rules_mask: int = 0
    verdict: str = ""  # VerdictKind name, lower case
    action: str | None = None  # KAction name, lower case
    enforced: bool = False
    address: str | None = None
    port: int | None = None
    file: str | None = None  # exec verdicts: the executable file's own name

    def _body(self) -> Json:
        return {"rule": self.rule, "rules_mask": self.rules_mask, "verdict": self.verdict,
                "action": self.action, "enforced": self.enforced, "address": self.address,
                "port": self.port, "file": self.file}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KernelVerdictRecord:
        return cls(**cls._head(d), rule=_int(d, "rule"), rules_mask=_int(d, "rules_mask"),
                   verdict=_str(d, "verdict"), action=_opt_str(d, "action"),
                   enforced=bool(d.get("enforced")), address=_opt_str(d, "address"),
                   port=_opt_int(d, "port"), file=_opt_str(d, "file"))


@dataclass(frozen=True, kw_only=True)
class ExitRecord(EventRecord):
    EVENT: ClassVar[str] = "exit"
    exit_status: int = -1
    exit_code: int | None = None
    signal: int | None = None
    ppid: int = 0
    cpu_ns: int = 0

    def _body(self) -> Json:
        return {"exit_status": self.exit_status, "exit_code": self.exit_code,
                "signal": self.signal, "ppid": self.ppid, "cpu_ns": self.cpu_ns}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ExitRecord:
        return cls(**cls._head(d), exit_status=_int(d, "exit_status", -1),
                   exit_code=_opt_int(d, "exit_code"), signal=_opt_int(d, "signal"),
                   ppid=_int(d, "ppid"), cpu_ns=_int(d, "cpu_ns"))


@dataclass(frozen=True, kw_only=True)
class PolicyVerdictRecord:
    """The judge's verdict line as the event stream carries it (event "policy_verdict"):
    the fields `top` reads. `outcome` is the log line's text; `kind` the Outcome it names
    (None from a monitor that did not send outcome_label)."""

    EVENT: ClassVar[str] = "policy_verdict"
    agent: str = ""
    rule: str = ""
    action: str = ""
    mode: str = ""
    outcome: str = ""
    kind: Outcome | None = None
    session: int = 0
    pid: int = 0
    reason: str = ""
    exe: str | None = None
    destination: str | None = None

    def to_json(self) -> Json:
        return {"event": self.EVENT, "agent": self.agent, "rule": self.rule,
                "action": self.action, "mode": self.mode, "outcome": self.outcome,
                "outcome_label": self.kind.label if self.kind else None,
                "session": self.session, "pid": self.pid, "reason": self.reason,
                "exe": self.exe, "destination": self.destination}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PolicyVerdictRecord:
        return cls(agent=_str(d, "agent"), rule=_str(d, "rule"), action=_str(d, "action"),
                   mode=_str(d, "mode"), outcome=_str(d, "outcome"),
                   kind=Outcome.of_label(d.get("outcome_label")),
                   session=_int(d, "session"), pid=_int(d, "pid"), reason=_str(d, "reason"),
                   exe=_opt_str(d, "exe"), destination=_opt_str(d, "destination"))


StreamRecord = EventRecord | PolicyVerdictRecord
_KINDS: dict[str, Any] = {c.EVENT: c for c in (ExecRecord, ConnectRecord, ForkRecord,
                                                KernelVerdictRecord, ExitRecord,
                                                PolicyVerdictRecord)}


def parse_record(d: Mapping[str, Any]) -> StreamRecord | None:
    """The typed record a streamed dict holds, or None for a kind this version does not know."""
    kind = _KINDS.get(str(d.get("event")))
    if kind is None:
        return None
    record: StreamRecord = kind.from_json(d)
    return record


# --- the status reply ------------------------------------------------------------------------


def _flat(record: Any) -> Json:
    """A flat record's fields in order, tuples as lists (as JSON has them)."""
    return {f.name: list(v) if isinstance(v := getattr(record, f.name), tuple) else v
            for f in fields(record)}


@dataclass(frozen=True)
class SessionStatus:
    session: int
    agent: str
    root_pid: int
    processes: int
    cpu_seconds: float
    execs: int
    connects: int

    def to_json(self) -> Json:
        return _flat(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SessionStatus:
        return cls(_int(d, "session"), _str(d, "agent") or "-", _int(d, "root_pid"),
                   _int(d, "processes"), _float(d, "cpu_seconds"), _int(d, "execs"),
                   _int(d, "connects"))


@dataclass(frozen=True)
class PolicyStatus:
    source: str = ""
    sha256: str = ""
    mode: str = ""
    rules: int = 0
    kernel_rules: tuple[str, ...] = ()

    def to_json(self) -> Json:
        return _flat(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PolicyStatus:
        return cls(_str(d, "source"), _str(d, "sha256"), _str(d, "mode"), _int(d, "rules"),
                   _strs(d, "kernel_rules"))


@dataclass(frozen=True)
class VerdictTotal:
    agent: str
    rule: str
    action: str
    mode: str
    count: int

    def to_json(self) -> Json:
        return _flat(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> VerdictTotal:
        return cls(_str(d, "agent"), _str(d, "rule"), _str(d, "action"), _str(d, "mode"),
                   _int(d, "count"))


@dataclass(frozen=True)
class StatusReply:
    """The `status` answer (without the "ok" the control socket adds)."""

    probes: int = 0
    probes_expected: int = 0
    events: int = 0
    policy: PolicyStatus = field(default_factory=PolicyStatus)
    verdicts: tuple[VerdictTotal, ...] = ()
    decode_errors: int = 0
    sessions: tuple[SessionStatus, ...] = ()
    processes_evicted: int = 0
    counters: dict[str, int] = field(default_factory=dict)  # BPF counter name -> value
    agents: tuple[str, ...] = ()

    def to_json(self) -> Json:
        return {"probes": self.probes, "probes_expected": self.probes_expected,
                "events": self.events, "policy": self.policy.to_json(),
                "verdicts": [v.to_json() for v in self.verdicts],
                "decode_errors": self.decode_errors,
                "sessions": [s.to_json() for s in self.sessions],
                "processes_evicted": self.processes_evicted, "counters": dict(self.counters),
                "agents": list(self.agents)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> StatusReply:
        def dicts(key: str) -> list[Mapping[str, Any]]:
            value = d.get(key)
            return [x for x in value if isinstance(x, Mapping)] \
                if isinstance(value, list) else []

        policy = d.get("policy")
        counters = d.get("counters")
        return cls(
            probes=_int(d, "probes"), probes_expected=_int(d, "probes_expected"),
            events=_int(d, "events"),
            policy=PolicyStatus.from_json(policy if isinstance(policy, Mapping) else {}),
            verdicts=tuple(VerdictTotal.from_json(v) for v in dicts("verdicts")),
            decode_errors=_int(d, "decode_errors"),
            sessions=tuple(SessionStatus.from_json(s) for s in dicts("sessions")),
            processes_evicted=_int(d, "processes_evicted"),
            counters={str(k): _int(counters, k) for k in counters}
            if isinstance(counters, Mapping) else {},
            agents=_strs(d, "agents"))
