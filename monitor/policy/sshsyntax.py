"""OpenSSH 9's lexing and pattern matching for ssh_config, as monitor/policy/sshconfig.py
needs them: argument splitting (misc.c argv_split), Match tokens (misc.c strdelim), host and
user patterns (match.c match_pattern, match_pattern_list), Hostname's %h and the
destination's user@host.

Pure functions of strings. Patterns are matched through regexes that cannot backtrack
catastrophically (ssh's own recursive matcher can), so an agent's pattern costs time
linear in practice and bounded by its length times the host's.
"""

from __future__ import annotations

import re
from functools import lru_cache

from monitor.policy.sshargs import split_config_line

_WS = " \t\r\n"


CACHED_MAX = 16 * 1024  # longer texts, lines and patterns are worked out every time


def argv_split(s: str) -> tuple[str, ...] | None:
    """Arguments of a config line like OpenSSH's argv_split (None: unbalanced quote)."""
    return _argv_split_cached(s) if len(s) <= 1024 else _argv_split(s)


@lru_cache(maxsize=4096)  # pure; the same lines come back at every ssh exec
def _argv_split_cached(s: str) -> tuple[str, ...] | None:
    return _argv_split(s)


def _argv_split(s: str) -> tuple[str, ...] | None:
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        if s[i] in " \t":
            i += 1
            continue
        if s[i] == "#":
            break
        quote, arg = "", []
        while i < n:
            c = s[i]
            if c == "\\" and i + 1 < n and (s[i + 1] in "'\"\\" or not quote and s[i + 1] == " "):
                arg.append(s[i + 1])
                i += 2
                continue
            if not quote and c in " \t":
                break
            if not quote and c in "'\"":
                quote = c
            elif quote and c == quote:
                quote = ""
            else:
                arg.append(c)
            i += 1
        if quote:
            return None
        out.append("".join(arg))
    return tuple(out)


def lex(text: str) -> tuple[tuple[int, str, str], ...]:
    """(line number, lowercased keyword, rest) of each line of a config file that has a
    keyword, like readconf.c reads it: a NUL ends a line (C strings), comments and blank
    lines are skipped. Cached by content (small files): the files are still read at every
    exec."""
    return _lex_cached(text) if len(text) <= CACHED_MAX else _lex(text)


@lru_cache(maxsize=256)
def _lex_cached(text: str) -> tuple[tuple[int, str, str], ...]:
    return _lex(text)


def _lex(text: str) -> tuple[tuple[int, str, str], ...]:
    out = []
    for number, line in enumerate(text.split("\n"), 1):
        keyword, rest = split_config_line(line.split("\0", 1)[0])
        if keyword is not None:
            out.append((number, keyword.lower(), rest))
    return tuple(out)


def strdelim_all(s: str) -> list[str] | None:
    """Tokens of a Match line as OpenSSH's strdelim() yields them (None: bad quote)."""
    out: list[str] = []
    while True:
        m = re.search(r'[ \t\r\n"=]', s)
        if m is None:
            out.append(s)
            return out
        j = m.start()
        if s[j] == '"':
            close = s.find('"', j + 1)
            if close < 0:
                return None
            out.append(s[:j] + s[j + 1:close])
            s = s[close + 1:].lstrip(_WS)
            continue
        equals = s[j] == "="
        out.append(s[:j])
        s = s[j + 1:].lstrip(_WS)
        if s.startswith("=") and not equals:
            s = s[1:].lstrip(_WS)
        if not s:
            return out


def _glob_regex(pattern: str) -> re.Pattern[str]:
    return _glob_regex_cached(pattern) if len(pattern) <= 1024 else _compile_glob(pattern)


@lru_cache(maxsize=2048)
def _glob_regex_cached(pattern: str) -> re.Pattern[str]:
    return _compile_glob(pattern)


def _compile_glob(pattern: str) -> re.Pattern[str]:
    """ssh's match_pattern (`*`, `?`) as a regex with no catastrophic backtracking: each
    middle segment is found leftmost and committed (an atomic group), which is exact."""
    def seg(text: str) -> str:
        return "".join("." if c == "?" else re.escape(c) for c in text)
    parts = re.split(r"\*+", pattern)
    if len(parts) == 1:
        return re.compile(seg(pattern) + r"\Z", re.S)
    middle = "".join(f"(?>.*?{seg(p)})" for p in parts[1:-1])
    return re.compile(seg(parts[0]) + middle + ".*" + seg(parts[-1]) + r"\Z", re.S)


def match_pattern(s: str, pattern: str) -> bool:
    return _glob_regex(pattern).match(s) is not None


def match_pattern_list(s: str, patterns: str, lower: bool) -> int:
    """match.c match_pattern_list: 1 positive, 0 none, -1 a negated pattern matched."""
    positive = 0
    for sub in patterns.split(","):
        negated = sub.startswith("!")
        sub = sub[1:] if negated else sub
        if len(sub) >= 1023:
            return 0
        if match_pattern(s, sub.lower() if lower else sub):
            if negated:
                return -1
            positive = 1
    return positive


def percent_h(value: str, host: str) -> str | None:
    """percent_expand(value, "h", host) as ssh.c applies it to Hostname; None when ssh
    would refuse an unknown %-escape."""
    out, i = [], 0
    while i < len(value):
        if value[i] != "%":
            out.append(value[i])
        elif value[i + 1:i + 2] == "%":
            out.append("%")
            i += 1
        elif value[i + 1:i + 2] == "h":
            out.append(host)
            i += 1
        else:
            return None
        i += 1
    return "".join(out)


def parse_destination(dest: str) -> tuple[str, str | None]:
    """(host, user) of a destination: user@host (the last '@') or ssh://[user@]host[:port]."""
    if dest.startswith("ssh://"):
        rest = dest[6:].split("/", 1)[0]
        user, _, hostport = rest.rpartition("@") if "@" in rest else ("", "", rest)
        if hostport.startswith("["):
            host = hostport[1:].split("]", 1)[0]
        else:
            host = hostport.split(":", 1)[0]
        return host, user or None
    user, at, host = dest.rpartition("@")
    return (host, user) if at else (dest, None)
