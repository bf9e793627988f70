"""The typed events the probes report, and the enums and limits they are made of.

Pure vocabulary: the values mirror probes/agentwatch.h (a unit test compares every shared
#define with the enum or constant here), the events are plain dataclasses. Decoding the
ring-buffer bytes into these events is the kernel side's job (monitor/kernel/abi.py); this
module imports nothing but the standard library and never reads bytes, a map or a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

COMM_LEN = 16
PATH_LEN = 256
MAX_ARGS = 20
ARG_LEN = 128
ARGS_SIZE = MAX_ARGS * ARG_LEN
ADDR_LEN = 16  # an address in events and keys: IPv6, or IPv4 mapped
V4_OFFSET = 12  # where the IPv4 address starts in its IPv4-mapped form
SESSION_KERNEL_BIT = 0x80000000
STATUS_UNSET = -1
ANY_UID = 0xFFFFFFFF
AGENT_PENDING = 0xFFFFFFFF


class EventType(IntEnum):
    FORK = 1
    EXEC = 2
    CONNECT = 3
    EXIT = 4
    VERDICT = 5


MAX_RULES = 64
MAX_AGENTS = 256


class KAction(IntEnum):
    ALERT = 1
    DENY = 2
    KILL = 3
    KILL_AGENT = 4


class VerdictKind(IntEnum):
    EXEC = 1
    CONNECT = 2
    DOOMED = 3


class RuleMask(IntEnum):
    ANY_ADDR = 0
    ANY_PORT = 1
    INET = 2
    INET6 = 3
    OUTSIDE = 4
    KILL = 5
    DENY = 6
    ENFORCE = 7
    FILELESS = 8  # exec rules that match any fileless exec (`fileless: true` alone)


RULE_MASK_SLOTS = 9


class ExecFlag(IntFlag):
    ARGV_TRUNC_COUNT = 0x1
    ARGV_TRUNC_LEN = 0x2
    ARGV_MISSING = 0x4
    NEW_ROOT = 0x8
    UNTRACKED = 0x10
    ARGV_FAULT = 0x20
    CANDIDATE = 0x40
    ARGV_FROM_MM = 0x80
    FILELESS = 0x100  # the executable has no links: a memfd, a deleted or O_TMPFILE file
    # set in userspace (monitor/sessions/completion.py), never by the probes:
    ARGV_COMPLETED = 0x10000  # the probes' copy was cut; /proc showed the same bytes
    # continued, and argv is the whole command line
    ARGV_UNCONFIRMED = 0x20000  # the probes' copy was cut and /proc could not confirm the
    # rest (process gone, or another command line by then): judged on the cut copy
    ARGV_CLIPPED = 0x40000  # argv holds the head and tail of a longer command line


# The same bits as plain ints, for the hot path: every IntFlag operation (`&`, `|`, the
# constructor) goes through enum machinery and cost ~1 us per exec event in all.
FLAG_ARGV_TRUNCATED = int(ExecFlag.ARGV_TRUNC_COUNT | ExecFlag.ARGV_TRUNC_LEN)
FLAG_ARGV_MISSING = int(ExecFlag.ARGV_MISSING)
FLAG_NEW_ROOT = int(ExecFlag.NEW_ROOT)
FLAG_CANDIDATE = int(ExecFlag.CANDIDATE)
FLAG_ARGV_FROM_MM = int(ExecFlag.ARGV_FROM_MM)
FLAG_ARGV_COMPLETED = int(ExecFlag.ARGV_COMPLETED)
FLAG_ARGV_UNCONFIRMED = int(ExecFlag.ARGV_UNCONFIRMED)
FLAG_ARGV_CLIPPED = int(ExecFlag.ARGV_CLIPPED)
FLAG_FILELESS = int(ExecFlag.FILELESS)


class ConnectFlag(IntFlag):
    """Flags of a connect record and of a connect verdict."""

    SEND = 0x1  # a UDP datagram sent with an address (sendto, sendmsg, sendmmsg, io_uring),
    # seen by the cgroup sendmsg4/sendmsg6 hooks: not a connect
    UNCHECKED = 0x2  # a verdict on opening a raw or ICMP socket: no destination to check


FLAG_CONNECT_SEND = int(ConnectFlag.SEND)
FLAG_CONNECT_UNCHECKED = int(ConnectFlag.UNCHECKED)


class Counter(IntEnum):
    LOST = 0
    CONNECTS = 1
    SENDS = 2  # UDP datagrams sent with an address (cgroup sendmsg hooks)
    FORKS = 3
    ROOTS = 4
    PROC_FULL = 5
    DENIED = 6
    KILLS = 7
    DECISION_LOST = 8
    SHED = 9
    UNTRACKABLE = 10


COUNTER_SLOTS = 11


class Setting(IntEnum):
    EXEC_CANDIDATES = 0
    MONITOR_TGID = 1
    GEN = 2
    WAKE = 3
    FAIL_CLOSED = 4
    CONNECT_DECIDE = 5
    UNTRACKABLE = 6


SETTING_SLOTS = 7


class Heartbeat(IntEnum):
    """Indices of the `heartbeat` array."""

    BEAT = 0  # the monitor's last heartbeat, monotonic ns (bpf_ktime_get_ns)
    LIMIT = 1  # fail closed after this many ns without one (0: off)


HEARTBEAT_SLOTS = 2


class Doom(IntEnum):
    """Values of the `doomed` map: why a session is being killed whole."""

    POLICY = 1  # a kill-agent rule: killed in enforce mode only
    MANUAL = 2  # the operator's kill switch: killed in monitor mode too


# Every rule and matcher map exists GENERATIONS times (Setting.GEN says which is in force):
# array maps are indexed gen * size + index, hash and LPM keys carry the generation.
GENERATIONS = 2
PORT_SLOTS = 65536  # `port_rules` entries per generation
NET_GEN_BITS = 8  # prefix bits of a `net_rules` key taken by its generation byte


class Family(IntEnum):
    INET = 2
    INET6 = 10


# --- typed events ---------------------------------------------------------------------------


# Events are plain slotted dataclasses, not frozen ones: a frozen dataclass's __init__
# sets each field through object.__setattr__ and costs 4x as much (1.0 vs 0.24 us for the
# header on these machines), twice per event on the hot path. Nothing mutates an event;
# changes go through dataclasses.replace().
@dataclass(slots=True)
class Header:
    ts_ns: int
    pid: int
    tid: int
    session: int
    agent: int
    uid: int
    comm: str

    @property
    def tracked(self) -> bool:
        return self.session != 0


@dataclass(slots=True)
class ForkEvent:
    h: Header
    child_pid: int
    kind = EventType.FORK


@dataclass(slots=True)
class ExecEvent:
    h: Header
    old_tid: int
    ppid: int
    cgroup_id: int
    flags: int  # ExecFlag bits, kept a plain int (see FLAG_*)
    filename: str
    argv: tuple[str, ...]
    # the whole command line (arguments joined by single spaces) when argv holds only a clip
    # of it (more than cmdline.SPLIT_MAX_ARGS arguments); None when argv is all of it
    line: str | None = None
    fileless: bool = False  # the executable has no links (/proc/PID/exe, sessions stage)
    # the interpreter's real path when the exec ran a program through it (ld.so PROGRAM):
    # filename and argv are then the program's (monitor/sessions/loader.py)
    loader: str | None = None
    # a loader run: other (path, argv) judged too (the loader's own exec; every possible
    # program when its command line cannot be read for certain)
    loader_others: tuple[tuple[str, tuple[str, ...]], ...] = ()
    ssh_config: frozenset[str] | None = None  # features an ssh config requests (None: not resolved)
    ssh_config_from: tuple[tuple[str, str], ...] = ()  # (feature, "file:line" or why)
    sha256: str | None = None  # the executable's content (sessions/identity.py); None: not read
    # the executable's absolute path, symlinks resolved (readlink /proc/PID/exe), when the
    # exec named it otherwise ("./x", a symlink, a relative path); None: filename is it
    real_exe: str | None = None
    kind = EventType.EXEC

    @property
    def is_fileless(self) -> bool:
        """The executable has no links (a memfd, a deleted or O_TMPFILE file): as the
        probes saw it at exec (FLAG_FILELESS), or as /proc showed it."""
        return self.fileless or bool(self.flags & FLAG_FILELESS)

    @property
    def argv_truncated(self) -> bool:
        """argv is not the whole command line (cut by the probes and not completed, or
        clipped)."""
        flags = self.flags
        return bool(flags & FLAG_ARGV_TRUNCATED and not flags & FLAG_ARGV_COMPLETED
                    or flags & FLAG_ARGV_CLIPPED)


@dataclass(slots=True)
class ConnectEvent:
    h: Header
    family: Family
    address: str
    port: int
    protocol: int  # IPPROTO_*: 6 TCP, 17 UDP; reported before the connect happens
    # a UDP datagram sent with this destination (sendto, sendmsg, ...), not a connect; both
    # meet the same connect rules
    send: bool = False
    kind = EventType.CONNECT

    @property
    def transport(self) -> str:
        return _TRANSPORTS.get(self.protocol, str(self.protocol))


@dataclass(slots=True)
class ExitEvent:
    h: Header
    exit_status: int
    ppid: int
    cpu_ns: int
    kind = EventType.EXIT

    @property
    def exit_code(self) -> int | None:
        if self.exit_status == STATUS_UNSET or self.exit_status & 0x7F:
            return None
        return (self.exit_status >> 8) & 0xFF

    @property
    def signal(self) -> int | None:
        if self.exit_status == STATUS_UNSET:
            return None
        return (self.exit_status & 0x7F) or None


@dataclass(slots=True)
class VerdictEvent:
    """A kernel rule matched; `enforced` says whether the kernel killed/refused."""

    h: Header
    verdict: VerdictKind
    rule: int
    mask: int
    action: KAction | None
    enforced: bool
    family: int
    address: str
    port: int
    file: str = ""  # exec verdicts: the executable file's name as the kernel looked it up
    send: bool = False  # a connect verdict on a datagram send (ConnectEvent.send)
    # a connect verdict on opening a raw or ICMP socket (no address, no port): allow-list
    # rules fire on it because no hook sees where its datagrams go
    unchecked: bool = False
    kind = EventType.VERDICT

    def rules(self) -> list[int]:
        return [i for i in range(MAX_RULES) if self.mask >> i & 1]

    @property
    def family_name(self) -> str:
        """ipv4 or ipv6 for a connect verdict's family, else its number."""
        names = {int(Family.INET): "ipv4", int(Family.INET6): "ipv6"}
        return names.get(self.family, str(self.family))


Event = ForkEvent | ExecEvent | ConnectEvent | ExitEvent | VerdictEvent

_TRANSPORTS = {6: "tcp", 17: "udp", 262: "mptcp"}
