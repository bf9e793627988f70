"""Which forwarding features an OpenSSH 9 client requests because of its config files.

`ssh -F cfg host`, or `ssh alias` where ~/.ssh/config gives `Host alias` a RemoteForward,
requests a forward that its command line does not show (monitor/policy/sshargs.py parses
the command line). This module resolves the configuration the way ssh(1) of OpenSSH 9
does (readconf.c, checked against `ssh -G` in tests/unit/test_sshconfig.py) and says which
features it requests and from which file and line:

* files: the last `-F FILE` alone (`-F none`: no file at all), else the user's config and
  then /etc/ssh/ssh_config. The caller says which user configs to consider; each is
  resolved on its own and the results are united (a conservative union);
* lines: case-insensitive keyword, whitespace or one `=`, arguments split like ssh
  (quotes, backslash escapes, `#` comments); `-o` options on the command line come first,
  so they win for single-value keywords, as in ssh;
* `Host` patterns (`*`, `?`, `!negation`, lists; case-sensitive, against the destination
  as typed) and `Match` (host, originalhost, user, localuser, all, canonical, final,
  exec, ...). A criterion that would run something (`exec`) or that cannot be decided
  without the network or a newer ssh (`localnetwork`, `tagged`, unknown ones) is taken
  as APPLYING whichever way it is negated: the conservative side. A block that only may
  apply can add features but never take one away (its `ClearAllForwardings yes` or
  `Tunnel no` does not hide a later forward);
* `Include` (globs, relative to ~/.ssh in user configs and /etc/ssh in the system one,
  read also inside blocks that do not apply, as ssh parses them), nested at most
  MAX_DEPTH deep like ssh, MAX_READS files and MAX_LINES lines in all;
* first value wins for single-value keywords; RemoteForward, LocalForward and
  DynamicForward accumulate; `ClearAllForwardings yes` drops every forward and the tunnel;
  `Match final` and `CanonicalizeHostname` make ssh read the files a second time with
  the final host name (lowercased, and the CanonicalDomains it may get).

A file that cannot be read within bounds (Unreadable from the caller's reader, too deep,
too many files or lines) makes the result EVERY feature: an ssh whose config the monitor
cannot see is judged as asking for everything. ProxyCommand, ProxyJump, LocalCommand and
Match exec are never run. Pure: no I/O (files come through the caller's Files), no
environment, no clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from monitor.policy import sshargs
from monitor.policy.sshargs import FEATURES, SshRequest, split_config_line
from monitor.policy.sshsyntax import (
    argv_split,
    lex,
    match_pattern,
    match_pattern_list,
    parse_destination,
    percent_h,
    strdelim_all,
)

MAX_DEPTH = 16  # OpenSSH's READCONF_MAX_DEPTH
MAX_READS = 256  # config files read (each Include of a file counts), all passes together
MAX_LINES = 200_000  # lines processed, all passes and user configs together
MAX_HOST = 1025  # longer host names are not matched against patterns (undecided)
USER_DIR = "~/.ssh"  # where a relative Include of a user config is
SYSTEM_DIR = "/etc/ssh"  # ...and of the system config
SYSTEM_CONFIG = "/etc/ssh/ssh_config"
COMMAND_LINE = "the command line"
UNDECIDED = " (a block the monitor cannot decide, taken as applying)"

Tri = bool | None  # True, False, or None: cannot be decided (taken as applying)

_FORWARDS = {"remoteforward": sshargs.REMOTE_FORWARD, "localforward": sshargs.LOCAL_FORWARD,
             "dynamicforward": sshargs.DYNAMIC_FORWARD}
_OPTION_FORWARDS = {"R": sshargs.REMOTE_FORWARD, "L": sshargs.LOCAL_FORWARD,
                    "D": sshargs.DYNAMIC_FORWARD}
_SCALARS = frozenset({"tunnel", "gatewayports", "clearallforwardings", "hostname", "user",
                      "canonicalizehostname", "canonicaldomains",
                      "canonicalizepermittedcnames", "tag"})
_YES = frozenset({"yes", "true"})
_TUNNEL_ON = frozenset({"yes", "true", "point-to-point", "ethernet"})
_CANON_ON = frozenset({"yes", "true", "always"})


class Unreadable(Exception):
    """A config file that cannot be read within bounds; str() says which and why."""


class Files(Protocol):
    """The caller's view of the files ssh would read (monitor/sessions/sshconfig.py)."""

    def read(self, path: str) -> str | None:
        """The text of path; None when it does not exist. Raises Unreadable."""

    def glob(self, pattern: str) -> list[str]:
        """Sorted paths matching pattern (glob(3) with GLOB_TILDE). Raises Unreadable."""

    def absolute(self, path: str) -> str:
        """path as the reasons name it (a relative -F path made absolute)."""


@dataclass(frozen=True)
class ConfigResult:
    """What the config files make ssh request (features the command line alone does not)."""

    features: frozenset[str]
    sources: tuple[tuple[str, str], ...] = ()  # (feature, "file:line" or why), sorted
    unreadable: str | None = None  # why every feature is assumed, when it is

    def where(self, feature: str) -> str:
        return next((w for f, w in self.sources if f == feature), "")


def everything(why: str) -> ConfigResult:
    """The conservative verdict for an ssh whose config cannot be seen."""
    return ConfigResult(FEATURES, tuple((f, why) for f in sorted(FEATURES)), why)


def _and(a: Tri, b: Tri) -> Tri:
    if a is False or b is False:
        return False
    return None if a is None or b is None else True


def _over(values: Iterable[str] | None, test: Callable[[str], bool]) -> Tri:
    """True if test holds for every value, False for none, None if mixed or unknown."""
    if values is None:
        return None
    seen = {test(v) for v in values}
    return None if len(seen) != 1 else seen.pop()


# --- the resolution ---------------------------------------------------------------------------


class _Scalar:
    """A single-value keyword: first value wins. Values offered from blocks that only may
    apply are kept as possible without fixing the keyword."""

    __slots__ = ("values", "fixed")

    def __init__(self) -> None:
        self.values: list[tuple[str, str]] = []  # (value, where)
        self.fixed = False

    def offer(self, value: str, where: str, certain: bool) -> None:
        if not self.fixed:
            self.values.append((value, where))
            self.fixed = certain

    def force(self, value: str, where: str) -> None:
        self.values, self.fixed = [(value, where)], True

    def possible(self, default: str) -> list[tuple[str, str]]:
        return self.values if self.fixed else [*self.values, (default, "")]


@dataclass(frozen=True)
class _Pass:
    final: bool
    certain: Tri  # whether ssh makes this pass at all
    hosts: tuple[str, ...] | None  # what Host lines (and, in the final pass, Match host) see


class _Run:
    """One resolution: the command line, then each file of one world, once or twice."""

    def __init__(self, files: Files, host: str, local_user: str | None,
                 budget: list[int], texts: dict[str, str | None]) -> None:
        self.files, self.host, self.local_user = files, host, local_user
        self.budget = budget  # [reads left, lines left], shared by every world
        self.scalars = {k: _Scalar() for k in _SCALARS}
        self.forwards: dict[str, str] = {}
        self.final_seen = False
        self._texts = texts  # path -> text, read once per resolution
        self._globs: dict[str, list[str]] = {}

    def command_line(self, request: SshRequest) -> None:
        for letter, value in request.options:
            if letter == "o":
                keyword, rest = split_config_line(value)
                if keyword is not None and keyword.lower() not in ("host", "match", "include"):
                    self.setting(keyword.lower(), rest, COMMAND_LINE, True)
            elif letter in _OPTION_FORWARDS:
                self.forwards.setdefault(_OPTION_FORWARDS[letter], COMMAND_LINE)
            elif letter == "l":
                self.scalars["user"].offer(value, COMMAND_LINE, True)
            elif letter == "w":
                self.scalars["tunnel"].offer("yes", COMMAND_LINE, True)
            elif letter == "g":
                self.scalars["gatewayports"].force("yes", COMMAND_LINE)
            elif letter == "P":
                self.scalars["tag"].offer(value, COMMAND_LINE, True)
            elif letter == "":
                user = parse_destination(value)[1]
                if user is not None:
                    self.scalars["user"].offer(user, COMMAND_LINE, True)

    def setting(self, key: str, rest: str, where: str, certain: Tri) -> None:
        if certain is False or (key not in _FORWARDS and key not in _SCALARS):
            return
        args = argv_split(rest)
        if not args:
            return  # no argument or a bad quote: ssh refuses the whole config
        where = where if certain else where + UNDECIDED
        if key in _FORWARDS:
            self.forwards.setdefault(_FORWARDS[key], where)
        else:
            value = " ".join(args) if key == "canonicaldomains" else args[0]
            self.scalars[key].offer(value, where, certain is True)

    # --- files ----------------------------------------------------------------------------

    def top(self, path: str, userconf: bool, required: bool, p: _Pass) -> None:
        if required and path not in self._texts:
            self._texts[path] = self.files.read(path)
        if required and self._texts[path] is None:
            raise Unreadable(f"{path}: no such file (ssh refuses a missing -F file)")
        self._file(path, userconf, 0, True, [True], p)

    def _read(self, path: str) -> str | None:
        """The file's text, read once per resolution however often it is included (each
        inclusion counts against MAX_READS: ssh reads it each time)."""
        self.budget[0] -= 1
        if self.budget[0] < 0:
            raise Unreadable(f"more than {MAX_READS} config files to read")
        if path not in self._texts:
            self._texts[path] = self.files.read(path)
        return self._texts[path]

    def _file(self, path: str, userconf: bool, depth: int, ceiling: Tri, active: list[Tri],
              p: _Pass) -> None:
        if depth > MAX_DEPTH:
            raise Unreadable(f"{path}: Include nested more than {MAX_DEPTH} deep")
        text = self._read(path)
        if text is None:
            return
        shown = self.files.absolute(path)
        lines = lex(text)
        self.budget[1] -= len(lines)
        if self.budget[1] < 0:
            raise Unreadable(f"more than {MAX_LINES} config lines to read")
        for number, key, rest in lines:
            if key == "host":
                active[0] = _and(ceiling, self._host(rest, p))
            elif key == "match":
                active[0] = _and(ceiling, self._match(rest, p))
            elif key == "include":
                self._include(rest, userconf, depth, ceiling, active, p)
            else:
                self.setting(key, rest, f"{shown}:{number}", _and(active[0], p.certain))

    def _include(self, rest: str, userconf: bool, depth: int, ceiling: Tri,
                 active: list[Tri], p: _Pass) -> None:
        before = active[0]
        for arg in argv_split(rest) or ():
            if not arg or arg.startswith("~") and not userconf:
                continue  # ssh refuses the config
            if not arg.startswith(("/", "~")):
                arg = f"{USER_DIR if userconf else SYSTEM_DIR}/{arg}"
            if arg not in self._globs:
                self._globs[arg] = self.files.glob(arg)
            for path in self._globs[arg]:
                self._file(path, userconf, depth + 1, _and(ceiling, before), active, p)
                active[0] = before  # an included Match does not change the includer's state

    # --- conditions -------------------------------------------------------------------------

    def _host(self, rest: str, p: _Pass) -> Tri:
        args = argv_split(rest) or ()

        def test(host: str) -> bool:
            found = False
            for arg in args:
                negated = arg.startswith("!")
                if match_pattern(host, arg[1:] if negated else arg):
                    if negated:
                        return False
                    found = True
            return found

        return _over(p.hosts, test)

    def _hostnames(self, p: _Pass) -> tuple[str, ...] | None:
        """What `Match host` compares: the final host, or in the first pass the Hostname
        set so far (each possible one) with %h expanded."""
        if p.final:
            return p.hosts
        names = [percent_h(v, self.host) for v, _ in self.scalars["hostname"].possible("%h")]
        return None if None in names or len(self.host) > MAX_HOST else tuple(
            n for n in names if n is not None)

    def _match(self, rest: str, p: _Pass) -> Tri:
        tokens = strdelim_all(rest)
        if tokens is None:
            return None
        result: Tri = True
        attributes, i = 0, 0
        while i < len(tokens) and tokens[i] and not tokens[i].startswith("#"):
            attrib = tokens[i]
            i += 1
            negate = attrib.startswith("!")
            name = attrib[1:].lower() if negate else attrib.lower()
            if name == "all":
                if attributes > 1 or i < len(tokens) and tokens[i] and tokens[i][0] != "#":
                    return None  # ssh refuses the config
                return _and(result, not negate)
            attributes += 1
            if name in ("canonical", "final"):
                self.final_seen = self.final_seen or name == "final"
                result = _and(result, p.final != negate)
                continue
            if i >= len(tokens) or not tokens[i] or tokens[i].startswith("#"):
                return None  # no argument: ssh refuses the config
            arg = tokens[i]
            i += 1
            found = self._criterion(name, arg, p)
            if found is None and name not in ("exec",) and name not in _KNOWN:
                return None  # an attribute this ssh does not know: cannot align the rest
            result = _and(result, None if found is None else found != negate)
        return result if attributes else None

    def _criterion(self, name: str, arg: str, p: _Pass) -> Tri:
        if name == "host":
            return _over(self._hostnames(p),
                         lambda h: match_pattern_list(h.lower(), arg, True) == 1)
        if name == "originalhost":
            return match_pattern_list(self.host.lower(), arg, True) == 1
        if name == "user":
            users = [v for v, _ in self.scalars["user"].possible(self.local_user or "")]
            if self.local_user is None and not self.scalars["user"].fixed:
                return None
            return _over(users, lambda u: match_pattern_list(u, arg, False) == 1)
        if name == "localuser":
            if self.local_user is None:
                return None
            return match_pattern_list(self.local_user, arg, False) == 1
        if name == "tagged":
            tags = [v for v, _ in self.scalars["tag"].possible("")]
            return _over(tags, lambda t: match_pattern_list(t, arg, False) == 1)
        return None  # exec (never run), localnetwork (the host's interfaces), unknown

    # --- passes and result --------------------------------------------------------------------

    def final_pass(self) -> _Pass | None:
        canon = {v.lower() in _CANON_ON
                 for v, _ in self.scalars["canonicalizehostname"].possible("no")}
        certain: Tri = True if self.final_seen or canon == {True} else (
            None if True in canon else False)
        if certain is False:
            return None
        hosts: set[str] = set()
        for value, _ in self.scalars["hostname"].possible("%h"):
            name = percent_h(value, self.host)
            if name is None or len(name) > MAX_HOST:
                return _Pass(True, certain, None)
            hosts.add(name.lower())
            if ":" in name:
                hosts.add(name)  # ssh does not lowercase an address
        if True in canon:
            hosts.update({h.rstrip(".") for h in hosts})
            cnames = {v.lower() for v, _ in self.scalars["canonicalizepermittedcnames"].possible(
                "none")}
            if cnames - {"none"}:
                return _Pass(True, certain, None)  # CNAMEs followed: any name at all
            for domains, _ in self.scalars["canonicaldomains"].possible(""):
                hosts.update(f"{h}.{d}".lower() for h in list(hosts) for d in domains.split()
                             if d.lower() != "none")
        return _Pass(True, certain, tuple(sorted(hosts)))

    def result(self) -> dict[str, str]:
        """feature -> where it was first requested."""
        clear = {v.lower() in _YES
                 for v, _ in self.scalars["clearallforwardings"].possible("no")} == {True}
        out = {} if clear else dict(self.forwards)
        tunnel = [w for v, w in self.scalars["tunnel"].possible("no") if v.lower() in _TUNNEL_ON]
        if tunnel and not clear:
            out[sshargs.TUNNEL] = tunnel[0]
        gateway = [w for v, w in self.scalars["gatewayports"].possible("no")
                   if v.lower() in _YES]
        if gateway:
            out[sshargs.GATEWAY_PORTS] = gateway[0]
        return out


_KNOWN = frozenset({"host", "originalhost", "user", "localuser", "tagged", "localnetwork"})


def config_files(request: SshRequest, user_configs: Sequence[str]
                 ) -> list[list[tuple[str, bool, bool]]]:
    """The worlds to resolve: each a list of (path, is a user config, must exist). The last
    -F alone (`-F none`: nothing), else each user config followed by the system one."""
    given = [v for letter, v in request.options if letter == "F"]
    if given:
        return [] if given[-1].lower() == "none" else [[(given[-1], True, True)]]
    system = (SYSTEM_CONFIG, False, False)
    return [[(u, True, False), system] for u in user_configs] or [[system]]


def resolve(request: SshRequest, files: Files, *, user_configs: Sequence[str],
            local_user: str | None) -> ConfigResult:
    """The features ssh's config files request for this command line (see the module)."""
    if request.destination is None:
        return ConfigResult(frozenset())  # ssh prints its usage and requests nothing
    host = parse_destination(request.destination)[0]
    budget = [MAX_READS, MAX_LINES]
    texts: dict[str, str | None] = {}
    requested: dict[str, str] = {}
    try:
        worlds = config_files(request, user_configs) or [[]]
        for world in worlds:
            run = _Run(files, host, local_user, budget, texts)
            run.command_line(request)
            first = _Pass(False, True, (host,) if len(host) <= MAX_HOST else None)
            for path, userconf, required in world:
                run.top(path, userconf, required, first)
            final = run.final_pass() if world else None
            if final is not None:
                for path, userconf, _ in world:
                    run.top(path, userconf, False, final)
            for feature, where in run.result().items():
                if where != COMMAND_LINE:
                    requested.setdefault(feature, where)
    except Unreadable as exc:
        return everything(f"{exc}; an ssh whose config the monitor cannot read is judged as "
                          "requesting every feature")
    return ConfigResult(frozenset(requested), tuple(sorted(requested.items())))
