"""Which forwarding features an OpenSSH client command line asks for.

The policy's `ssh:` condition asks "does this ssh invocation request a remote forward (or a
dynamic forward, a tunnel, ...)?". An agent can spell that request many ways — combined
short flags (``-fNR 9000:localhost:22``), attached or separate option arguments, ``-o
RemoteForward=...`` with any capitalisation, spacing or quoting — so this module parses an
argv the way OpenSSH 9's ssh(1) does (its bundled POSIX getopt, checked against ``ssh -G``):

* options are parsed up to the first non-option, the destination; then ssh parses options
  once more after the destination, up to the next non-option (the remote command) or
  ``--``. So ``ssh host -R 9000:x:22`` requests a forward, while in ``ssh host ssh -R ...``
  the ``-R`` belongs to the remote command and requests nothing on this client;
* ``-o`` lines follow ssh_config syntax: keyword (case-insensitive, optionally quoted),
  whitespace or one ``=``, arguments;
* first value wins for ``Tunnel``, ``GatewayPorts`` and ``ClearAllForwardings``, as in
  ssh_config; ``-g`` always turns gateway ports on; ``-w`` turns the tunnel on unless
  ``Tunnel`` was already set; ``ClearAllForwardings yes`` drops every -L/-R/-D and -w.

What argv cannot tell (a ``-F`` config file, ``Include``, the user's ~/.ssh/config that a
host alias may pull forwards from, an unknown option) is listed in ``SshRequest.unknown``;
``SshRequest.options`` keeps every option in order for monitor/policy/sshconfig.py, which
resolves the config files.

A command line of more arguments than the monitor splits (monitor.model.cmdline.SPLIT_MAX_ARGS)
is not parsed: ``possible_features`` scans its whole text, in linear time, for every feature
some argument could request if it were an option, an over-estimate on purpose.
This module must never read files or the environment: it is pure, and runs on the hot path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

REMOTE_FORWARD = "remote_forward"
DYNAMIC_FORWARD = "dynamic_forward"
LOCAL_FORWARD = "local_forward"
TUNNEL = "tunnel"
GATEWAY_PORTS = "gateway_ports"
FEATURES = frozenset({REMOTE_FORWARD, DYNAMIC_FORWARD, LOCAL_FORWARD, TUNNEL, GATEWAY_PORTS})

# OpenSSH 9 ssh.c's getopt string:
#   "1246ab:c:e:fgi:kl:m:no:p:qstvxAB:CD:E:F:GI:J:KL:MNO:P:Q:R:S:TVw:W:XYy"
_WITH_ARG = frozenset("BbcDEeFIiJLlmOoPpQRSWw")
_FLAGS = frozenset("1246AaCfGgKkMNnqsTtVvXxYy")
_OPTION_FEATURE = {"R": REMOTE_FORWARD, "D": DYNAMIC_FORWARD, "L": LOCAL_FORWARD}
_KEYWORD_FEATURE = {"remoteforward": REMOTE_FORWARD, "dynamicforward": DYNAMIC_FORWARD,
                    "localforward": LOCAL_FORWARD}
_YES = frozenset({"yes", "true"})
_TUNNEL_ON = frozenset({"yes", "true", "point-to-point", "ethernet"})
_WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class SshRequest:
    """What one ssh command line asks for, as far as its argv can tell."""

    features: frozenset[str]  # subset of FEATURES
    destination: str | None  # None when argv has no destination (ssh would print usage)
    command: tuple[str, ...]  # the remote command: never parsed as options
    unknown: tuple[str, ...] = ()  # things argv alone cannot decide, one sentence each
    # every option in argv order as (letter, argument or ""), with ("", destination) where
    # the destination stood: what monitor/policy/sshconfig.py resolves the config files with
    options: tuple[tuple[str, str], ...] = ()


class _State:
    def __init__(self) -> None:
        self.forwards: set[str] = set()
        self.tunnel: bool | None = None  # first value wins
        self.gateway_option: bool | None = None  # first -o GatewayPorts wins...
        self.gateway_flag = False  # ...but -g always turns it on
        self.clear_forwardings: bool | None = None
        self.flags: set[str] = set()
        self.unknown: list[str] = []
        self.options: list[tuple[str, str]] = []

    def features(self) -> frozenset[str]:
        found = set() if self.clear_forwardings else set(self.forwards)
        if self.tunnel and not self.clear_forwardings:
            found.add(TUNNEL)
        if self.gateway_flag or self.gateway_option:
            found.add(GATEWAY_PORTS)
        return frozenset(found)

    def option(self, letter: str, value: str) -> None:
        self.options.append((letter, value))
        if letter in _OPTION_FEATURE:
            self.forwards.add(_OPTION_FEATURE[letter])
        elif letter == "w":
            if self.tunnel is None:
                self.tunnel = True
        elif letter == "o":
            self.config_line(value)
        elif letter == "F":
            self.unknown.append(f"-F {value}: options in that config file are not read")

    def flag(self, letter: str) -> None:
        self.flags.add(letter)
        self.options.append((letter, ""))
        if letter == "g":
            self.gateway_flag = True

    def config_line(self, line: str) -> None:
        keyword, args = split_config_line(line)
        if keyword is None:
            return
        key = keyword.lower()
        value = args.split(None, 1)[0].strip('"').lower() if args.strip() else ""
        if not value:
            if key in _KEYWORD_FEATURE or key in ("tunnel", "gatewayports"):
                self.unknown.append(f"-o {line!r}: no argument after {keyword!r} "
                                    "(ssh refuses the command line)")
            return
        if key in _KEYWORD_FEATURE:
            self.forwards.add(_KEYWORD_FEATURE[key])
        elif key == "tunnel":
            if self.tunnel is None:
                self.tunnel = value in _TUNNEL_ON
        elif key == "gatewayports":
            if self.gateway_option is None:
                self.gateway_option = value in _YES
        elif key == "clearallforwardings":
            if self.clear_forwardings is None:
                self.clear_forwardings = value in _YES
        elif key == "include":
            self.unknown.append(f"-o {line!r}: included config files are not read")


def split_config_line(line: str) -> tuple[str | None, str]:
    """Split one ssh_config line into (keyword, rest) like OpenSSH's strdelim().

    The keyword ends at whitespace, a quote or '='; one '=' (with any whitespace around it)
    separates it from its arguments. A keyword in quotes loses them. Blank lines and
    comments give (None, "").
    """
    s = line.strip(_WHITESPACE + "\f")
    if not s or s.startswith("#"):
        return None, ""
    i = 0
    while i < len(s) and s[i] not in _WHITESPACE + '"=':
        i += 1
    keyword, rest = s[:i], s[i:]
    if rest.startswith('"'):
        close = rest.find('"', 1)
        if close < 0:
            return None, ""  # unbalanced quote: ssh rejects the line
        keyword, rest = keyword + rest[1:close], rest[close + 1:]
        return (keyword or None), rest.lstrip(_WHITESPACE)
    rest = rest.lstrip(_WHITESPACE)
    if rest.startswith("="):
        rest = rest[1:].lstrip(_WHITESPACE)
    if keyword.startswith("#"):
        return None, ""
    return (keyword or None), rest


def _getopt(args: Sequence[str], start: int, state: _State) -> tuple[int, bool]:
    """Parse options from args[start:] like POSIX getopt with ssh's option string.

    Returns (index of the first argument that is not an option, whether '--' ended it).
    """
    i = start
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return i + 1, True
        if len(arg) < 2 or not arg.startswith("-"):
            return i, False  # a non-option (also a lone "-")
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter in _WITH_ARG:
                if j < len(arg):
                    value = arg[j:]
                elif i + 1 < len(args):
                    i += 1
                    value = args[i]
                else:
                    state.unknown.append(f"-{letter} without its argument "
                                         "(ssh refuses the command line)")
                    return i + 1, False
                state.option(letter, value)
                break
            if letter in _FLAGS:
                state.flag(letter)
            else:
                state.unknown.append(f"unknown option -{letter} "
                                     "(ssh refuses the command line)")
        i += 1
    return i, False


def parse_ssh_argv(argv: Sequence[str]) -> SshRequest:
    """Parse an ssh client argv (argv[0] is the program) into what it requests."""
    state = _State()
    args = list(argv[1:])
    index, terminated = _getopt(args, 0, state)
    destination: str | None = None
    if index < len(args):
        destination = args[index]
        state.options.append(("", destination))
        index += 1
        if not terminated and index < len(args):
            index, terminated = _getopt(args, index, state)
    features = state.features()
    if destination is not None and "N" in state.flags and not features:
        state.unknown.append("-N with no forwarding on the command line: forwards may "
                             f"come from the ssh config for {destination!r}")
    return SshRequest(features=features, destination=destination,
                      command=tuple(args[index:]), unknown=tuple(state.unknown),
                      options=tuple(state.options))


def requested_features(argv: Sequence[str]) -> frozenset[str]:
    """The FEATURES an ssh argv requests (see parse_ssh_argv)."""
    return parse_ssh_argv(argv).features


# An argument that requests a feature if ssh parses it as an option: a cluster of flags ending
# in the feature's letter (-fNR, -R), or the -o keyword for it anywhere (-oRemoteForward=...,
# -o "remoteforward ..."). One pass over the arguments joined by spaces, no nested
# repetition: linear (50 ms for the 700,000 arguments the kernel's 6 MiB allows at most).
_CLUSTER = re.compile(" -[" + "".join(sorted(_FLAGS)) + "]*([RDLwg])")
_CLUSTER_FEATURE = {"R": REMOTE_FORWARD, "D": DYNAMIC_FORWARD, "L": LOCAL_FORWARD,
                    "w": TUNNEL, "g": GATEWAY_PORTS}
_KEYWORD_POSSIBLE = {"remoteforward": REMOTE_FORWARD, "dynamicforward": DYNAMIC_FORWARD,
                     "localforward": LOCAL_FORWARD, "tunnel": TUNNEL,
                     "gatewayports": GATEWAY_PORTS}


def possible_features(line: str) -> frozenset[str]:
    """Every FEATURE that some argument of an ssh command line (its arguments joined by
    single spaces) could request: what parse_ssh_argv would find, and possibly more (an
    argument of the remote command, a value that looks like an option)."""
    found = {_CLUSTER_FEATURE[m.group(1)] for m in _CLUSTER.finditer(" " + line)}
    lower = line.lower().replace('"', '')  # ssh_config joins quoted keyword parts
    found.update(f for word, f in _KEYWORD_POSSIBLE.items() if word in lower)
    return frozenset(found)
