"""Unit tests for monitor/policy/sshconfig.py and monitor/sessions/{sshconfig,rootfs}.py:
the forwards an ssh config requests, resolved as OpenSSH 9 does (compared with the real
`ssh -G` over many generated configs), and bad input (FIFOs, devices, huge files, Include
loops, hostile patterns) answered with the conservative verdict in bounded time."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from monitor.model.events import ExecEvent, Header
from monitor.policy.engine import evaluate_exec, wants_ssh_config
from monitor.policy.identity import HostBinaries
from monitor.policy.load import default_policy, load_policy_text
from monitor.policy.sshargs import FEATURES, parse_ssh_argv, requested_features
from monitor.policy.sshconfig import ConfigResult, Unreadable, resolve
from monitor.sessions.rootfs import RootFS
from monitor.sessions.sshconfig import MAX_STUCK, SshConfigStep, tilde_expand

R, D, L, W, G = "remote_forward", "dynamic_forward", "local_forward", "tunnel", "gateway_ports"
ME = pwd.getpwuid(os.getuid()).pw_name
HAVE_SSH = shutil.which("ssh") is not None


def ours(argv: list[str], home: Path, user_configs: tuple[str, ...] = ()) -> ConfigResult:
    with RootFS("/", str(home), tilde=lambda p: tilde_expand((), p, str(home))) as files:
        return resolve(parse_ssh_argv(argv), files, user_configs=user_configs, local_user=ME)


def features(argv: list[str], home: Path) -> set[str]:
    """What our argv parse and config resolution together say ssh requests."""
    return set(requested_features(argv) | ours(argv, home).features)


def ssh_says(argv: list[str], home: Path) -> set[str] | None:
    """What `ssh -G` (parse, print the resulting config, connect nowhere) reports."""
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    done = subprocess.run(["ssh", "-G", *argv[1:]], env=env, cwd=home, capture_output=True,
                          text=True, timeout=10, check=False, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        return None
    found: set[str] = set()
    for out in done.stdout.splitlines():
        key, _, value = out.partition(" ")
        found |= {"remoteforward": {R}, "dynamicforward": {D}, "localforward": {L}}.get(key, set())
        if key == "tunnel" and value != "false" or key == "gatewayports" and value == "yes":
            found.add(W if key == "tunnel" else G)
    return found


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- compared with the real ssh ---------------------------------------------------------------

HOSTS = ["a", "b.example", "MyHost", "web1", "bob@a", "ssh://bob@web1:2222", "A"]
PATTERNS = ["*", "a", "b.*", "!a", "web?", "My*", "*.example", "myhost", "a b.example",
            "* !web1", '"a"', "w*1"]
LISTS = ["a", "b.*", "!a,*", "web?,a", "*.example,!b.example", "myhost", "*"]
SETTINGS = ["RemoteForward 9000 localhost:22", "remoteforward=9001 localhost:22",
            '"LocalForward" 8080 localhost:80', "LocalForward\t8081 localhost:80 # x",
            "DynamicForward 1080", "DYNAMICFORWARD = 1081", "Tunnel yes", "Tunnel no",
            "Tunnel ethernet", "Tunnel point-to-point", "GatewayPorts yes", "GatewayPorts no",
            "ClearAllForwardings yes", "ClearAllForwardings no", "Hostname b.example",
            "Hostname %h.example", "HostName MyHost", "User bob", "User alice",
            "CanonicalizeHostname yes", "CanonicalizeHostname no", "SendEnv LANG",
            "# RemoteForward 1 x:1", "ProxyCommand false"]
MATCHES = ["Host {p}", "Host={p}", "Match host {l}", "Match originalhost {l}",
           "Match user bob", "Match !user bob", "Match localuser {me}", "Match !localuser {me}",
           "Match all", "Match final", "Match canonical", "Match !final host {l}",
           "Match canonical host {l}", "Match user bob,alice host {l}", "Match final all",
           "Match exec true", "Match exec false", "Match !exec false host {l}"]


def random_config(rng: random.Random, includes: list[str]) -> str:
    lines = []
    for _ in range(rng.randint(1, 9)):
        roll = rng.random()
        if roll < 0.3:
            lines.append(rng.choice(MATCHES).format(p=rng.choice(PATTERNS),
                                                    l=rng.choice(LISTS), me=ME))
        elif roll < 0.38 and includes:
            lines.append(f"Include {rng.choice(includes)}")
        else:
            lines.append(("  " if rng.random() < 0.5 else "") + rng.choice(SETTINGS))
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(not HAVE_SSH, reason="no ssh client on this machine")
def test_the_real_ssh_agrees_over_generated_configs(tmp_path: Path) -> None:
    rng = random.Random(12)
    compared = exec_blocks = 0
    for case in range(260):
        home = tmp_path / f"h{case}"
        dot = home / ".ssh"
        write(dot / "inc1", random_config(rng, []))
        write(dot / "more" / "x.conf", random_config(rng, []))
        write(dot / "more" / "y.conf", random_config(rng, ["inc1"]))
        main = write(home / "cfg", random_config(
            rng, ["inc1", "~/.ssh/more/*.conf", str(dot / "more" / "y.conf"), "nothing*"]))
        argv = ["ssh", "-F", str(main), *rng.choice(
            [[], ["-o", "ClearAllForwardings=yes"], ["-o", "Tunnel=no"], ["-l", "bob"],
             ["-o", "User=alice"], ["-R", "1:x:1"], ["-o", "GatewayPorts=no"]]),
            rng.choice(HOSTS)]
        said = ssh_says(argv, home)
        if said is None:
            continue  # ssh refuses this config (-G): nothing to compare
        text = "".join(p.read_text() for p in (main, dot / "inc1", *sorted(dot.glob("more/*"))))
        found = features(argv, home)
        if "exec" in text or "-R" in argv:
            # exec is taken as applying, and a config never takes back what argv asks for
            # (its ClearAllForwardings may cancel -R for ssh): never less than ssh
            exec_blocks += "exec" in text
            assert found >= said, (argv, text)
        else:
            assert found == said, (argv, main.read_text())
        compared += 1
    assert compared >= 150 and exec_blocks >= 20


@pytest.mark.skipif(not HAVE_SSH, reason="no ssh client on this machine")
@pytest.mark.parametrize(("config", "argv", "expected"), [
    ("Host alias\n  RemoteForward 9000 localhost:22\n", ["alias"], {R}),
    ("Host alias\n  RemoteForward 9000 localhost:22\n", ["Alias"], set()),  # case-sensitive
    ("Match host alias\n  RemoteForward 9000 localhost:22\n", ["ALIAS"], {R}),
    ("Host * !alias\n  DynamicForward 1080\n", ["alias"], set()),
    ("Host *\n  Tunnel no\n  Tunnel yes\n", ["x"], set()),  # first value wins
    ("RemoteForward 1 x:1\nHost x\n  RemoteForward 2 x:2\n  ClearAllForwardings yes\n",
     ["x"], set()),
    ("Host x\n  Hostname real.example\nMatch final host real.example\n  Tunnel yes\n",
     ["x"], {W}),
    ("Host x\n  Hostname real.example\nMatch host real.example\n  GatewayPorts yes\n",
     ["x"], {G}),
    ("Host x\n  Hostname real.example\nHost real.example\n  GatewayPorts yes\n",
     ["x"], set()),  # Host sees the name as typed in the first pass
    ("Match user bob\n  LocalForward 1 x:1\n", ["bob@x"], {L}),
    ("Match user bob\n  LocalForward 1 x:1\n", ["-l", "eve", "bob@x"], set()),
])
def test_spelled_cases_agree_with_ssh(tmp_path: Path, config: str, argv: list[str],
                                      expected: set[str]) -> None:
    cfg = write(tmp_path / "cfg", config)
    full = ["ssh", "-F", str(cfg), *argv]
    assert ssh_says(full, tmp_path) == expected
    assert features(full, tmp_path) == expected


def test_files_ssh_reads(tmp_path: Path) -> None:
    a = write(tmp_path / "a", "RemoteForward 1 x:1\n")
    b = write(tmp_path / "b", "LocalForward 1 x:1\n")
    user = write(tmp_path / ".ssh" / "config", "Host x\n  DynamicForward 5\n")
    assert ours(["ssh", "-F", str(a), "-F", str(b), "x"], tmp_path).features == {L}  # last -F
    assert ours(["ssh", "-F", str(a), "-F", "none", "x"], tmp_path).features == set()
    assert ours(["ssh", "x"], tmp_path, (str(user),)).features == {D}
    assert ours(["ssh", "y"], tmp_path, (str(user),)).features == set()
    assert ours(["ssh", "x"], tmp_path, (str(tmp_path / "none"),)).features == set()
    # -F relative to the process's cwd (the RootFS's), named whole in the reason
    found = ours(["ssh", "-F", "a", "x"], tmp_path)
    assert found.features == {R} and found.where(R) == f"{a}:1"
    # every user config considered is resolved, and the results united
    other = write(tmp_path / "other" / "config", "Tunnel yes\n")
    assert ours(["ssh", "x"], tmp_path, (str(user), str(other))).features == {D, W}


def test_an_undecidable_block_adds_but_never_hides(tmp_path: Path) -> None:
    cfg = write(tmp_path / "cfg", "Match exec \"test -e /nonexistent\"\n"
                "  ClearAllForwardings yes\n  Tunnel no\nHost *\n  RemoteForward 1 x:1\n"
                "  Tunnel yes\nMatch localnetwork 10.0.0.0/8\n  GatewayPorts yes\n")
    found = ours(["ssh", "-F", str(cfg), "h"], tmp_path)
    assert found.features == {R, W, G}
    assert "cannot decide" in found.where(G)


# --- bad input: conservative, bounded ---------------------------------------------------------

def everything_in(found: ConfigResult, why: str) -> None:
    assert found.features == FEATURES and found.unreadable is not None
    assert why in found.unreadable and "every feature" in found.unreadable


def test_a_config_that_cannot_be_read_requests_everything(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    huge = tmp_path / "huge"
    with open(huge, "wb") as f:
        f.truncate(100 << 30)  # 100 GB, sparse
    start = time.monotonic()
    for given, why in ((str(fifo), "FIFO"), ("/dev/zero", "character device"),
                       (str(huge), "larger than"), (str(tmp_path), "directory"),
                       (str(tmp_path / "missing"), "no such file")):
        everything_in(ours(["ssh", "-F", given, "h"], tmp_path), why)
    # /dev/stdin is a magic link out of the process's root: never followed
    assert ours(["ssh", "-F", "/dev/stdin", "h"], tmp_path).features == FEATURES
    # an Include of one, anywhere in the files, is the same
    write(tmp_path / "cfg", f"Host nothing\n  Include {fifo}\n")
    everything_in(ours(["ssh", "-F", str(tmp_path / "cfg"), "h"], tmp_path), "FIFO")
    assert time.monotonic() - start < 5


def test_dev_null_as_the_config_is_no_config_at_all(tmp_path: Path) -> None:
    """`ssh -F /dev/null` is the common way to say "no config file" (ssh reads it as empty):
    not a device the monitor cannot read (before, it was judged as asking for everything,
    and a copy of ssh run so with -L was killed)."""
    assert ours(["ssh", "-F", "/dev/null", "h"], tmp_path).features == frozenset()
    write(tmp_path / "cfg", "Host h\n  Include /dev/null\n  LocalForward 1 x:1\n")
    assert ours(["ssh", "-F", str(tmp_path / "cfg"), "h"], tmp_path).features == {
        "local_forward"}


def test_include_loops_and_fans_are_bounded(tmp_path: Path) -> None:
    write(tmp_path / "loop", f"Include {tmp_path}/loop\n")
    everything_in(ours(["ssh", "-F", str(tmp_path / "loop"), "h"], tmp_path), "deep")
    # each file includes the next twice: 2**16 reads unless bounded
    for i in range(16):
        write(tmp_path / f"f{i}", f"Include {tmp_path}/f{i + 1} {tmp_path}/f{i + 1}\n")
    write(tmp_path / "f16", "RemoteForward 1 x:1\n")
    start = time.monotonic()
    everything_in(ours(["ssh", "-F", str(tmp_path / "f0"), "h"], tmp_path), "files")
    assert time.monotonic() - start < 5


def test_hostile_patterns_take_linear_time(tmp_path: Path) -> None:
    cfg = write(tmp_path / "cfg", "Host " + "a*" * 400 + "b\n  RemoteForward 1 x:1\n"
                "Match host " + "*a" * 400 + "c\n  DynamicForward 1\n")
    start = time.monotonic()
    assert ours(["ssh", "-F", str(cfg), "a" * 1000], tmp_path).features == set()
    assert time.monotonic() - start < 2


# --- the sessions step over a /proc tree ----------------------------------------------------

def fake_proc(tmp: Path, pid: int, *, root: Path, cwd: str, environ: bytes, uid: int) -> Path:
    proc = tmp / "proc"
    (proc / str(pid)).mkdir(parents=True)
    os.symlink(root, proc / str(pid) / "root")
    os.symlink(cwd, proc / str(pid) / "cwd")
    (proc / str(pid) / "environ").write_bytes(environ)
    (proc / str(pid) / "status").write_text(f"Name:\tssh\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
    return proc


def ssh_exec(pid: int, argv: list[str], session: int = 5) -> ExecEvent:
    return ExecEvent(Header(1, pid, pid, session, 1, 1000, "ssh"), 0, 1, 0, 0,
                     "/usr/bin/ssh", tuple(argv))


def test_the_step_reads_the_process_view(tmp_path: Path) -> None:
    root = tmp_path / "root"  # the process's root: its own passwd, home and symlinks
    write(root / "etc" / "passwd", "root:x:0:0::/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n")
    write(root / "data" / "real", "Host alias\n  RemoteForward 9000 localhost:22\n")
    (root / "home" / "u" / ".ssh").mkdir(parents=True)
    os.symlink("/data/real", root / "home" / "u" / ".ssh" / "config")  # inside the root
    write(root / "elsewhere" / ".ssh" / "config", "Host alias\n  Tunnel yes\n")
    write(root / "work" / "cfg", "Host *\n  DynamicForward 1080\n")
    proc = fake_proc(tmp_path, 4242, root=root, cwd="/work", uid=1000,
                     environ=b"A=1\0HOME=/elsewhere\0HOME=/ignored\0")
    step = SshConfigStep(proc)
    ev = step.resolve(ssh_exec(4242, ["ssh", "alias"]), needed=True)
    assert ev.ssh_config == {R, W}  # the passwd home's config and $HOME's, united
    # (its absolute symlink followed inside the process's root, not the monitor's)
    assert dict(ev.ssh_config_from)[R] == "/home/u/.ssh/config:2"
    ev = step.resolve(ssh_exec(4242, ["ssh", "-F", "cfg", "alias"]), needed=True)
    assert ev.ssh_config == {D} and dict(ev.ssh_config_from)[D] == "/work/cfg:2"
    # not ssh, not an agent's, or gone: untouched
    assert step.resolve(ssh_exec(4242, ["ssh", "alias"]), needed=False).ssh_config is None
    assert step.resolve(ssh_exec(4242, ["ssh", "alias"], session=0),
                        needed=True).ssh_config is None
    assert step.resolve(ssh_exec(4243, ["ssh", "alias"]), needed=True).ssh_config is None


def test_the_verdict_says_which_file(tmp_path: Path) -> None:
    policy = default_policy()
    cfg = write(tmp_path / "cfg", "RemoteForward 9000 localhost:22\nLocalForward 1 x:1\n")
    found = ours(["ssh", "-F", str(cfg), "h"], tmp_path)
    verdicts = evaluate_exec(policy, agent="claude-code", session=1, pid=2,
                             exe="/usr/bin/ssh", comm="ssh", argv=["ssh", "-F", str(cfg), "h"],
                             ssh_config=found.features, ssh_config_from=found.sources)
    reasons = {v.rule: v.reason for v in verdicts}
    assert reasons["ssh-reverse-or-dynamic-forward"] == (
        f"ssh requests remote_forward (from {cfg}:1)")
    assert reasons["ssh-local-forward"] == f"ssh requests local_forward (from {cfg}:2)"
    # without the config, argv alone asks for nothing
    assert not evaluate_exec(policy, agent="claude-code", session=1, pid=2,
                             exe="/usr/bin/ssh", comm="ssh", argv=["ssh", "-F", str(cfg), "h"])


def test_a_nul_ends_a_line_as_in_c(tmp_path: Path) -> None:
    inc = write(tmp_path / "inc", "RemoteForward 1 x:1\n")
    cfg = write(tmp_path / "cfg", f"Include {inc}\0junk\nTunnel yes\0no\n")
    assert ours(["ssh", "-F", str(cfg), "h"], tmp_path).features == {R, W}


def test_a_read_that_hangs_costs_the_loop_a_bounded_wait(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A FUSE or NFS file that never answers (no O_NONBLOCK helps): the step waits at most
    its timeout, then judges at once while too many reads hang."""
    release = threading.Event()
    step = SshConfigStep(tmp_path, timeout_s=0.05)
    monkeypatch.setattr(step, "config_for", lambda ev: release.wait(10))
    try:
        start = time.monotonic()
        for _ in range(MAX_STUCK):
            ev = step.resolve(ssh_exec(4242, ["ssh", "alias"]), needed=True)
            assert ev.ssh_config == FEATURES
            assert "did not finish" in dict(ev.ssh_config_from)[R]
        assert time.monotonic() - start < MAX_STUCK * 0.05 + 1
        start = time.monotonic()
        ev = step.resolve(ssh_exec(4242, ["ssh", "alias"]), needed=True)
        assert time.monotonic() - start < 0.02 and "still hang" in dict(ev.ssh_config_from)[R]
    finally:
        release.set()


def test_globs_list_a_bounded_number_of_entries(tmp_path: Path) -> None:
    for d in range(6):
        (tmp_path / "many" / f"d{d}").mkdir(parents=True)
        for i in range(3000):
            (tmp_path / "many" / f"d{d}" / f"f{i}").touch()
    cfg = write(tmp_path / "cfg", f"Include {tmp_path}/many/*/nothing*\n")
    everything_in(ours(["ssh", "-F", str(cfg), "h"], tmp_path), "directory entries")


def test_what_dns_would_decide_is_taken_as_applying(tmp_path: Path) -> None:
    """Canonicalisation asks DNS which CanonicalDomains name exists (or where a CNAME
    leads): a block for any name it could give applies, never hides."""
    cfg = write(tmp_path / "cfg", "CanonicalizeHostname yes\nCanonicalDomains example.com\n"
                "Host a.example.com\n  RemoteForward 1 x:1\nHost other.example.com\n"
                "  DynamicForward 1\n")
    found = ours(["ssh", "-F", str(cfg), "a"], tmp_path)
    assert found.features == {R} and "cannot decide" in found.where(R)
    cfg = write(tmp_path / "cname", "CanonicalizeHostname yes\nCanonicalDomains example.com\n"
                "CanonicalizePermittedCNAMEs *:*\nHost *.evil.example\n  Tunnel yes\n")
    assert ours(["ssh", "-F", str(cfg), "a"], tmp_path).features == {W}
    # without canonicalisation there is no second pass and nothing to guess
    cfg = write(tmp_path / "plain", "Host a.example.com\n  RemoteForward 1 x:1\n")
    assert ours(["ssh", "-F", str(cfg), "a"], tmp_path).features == set()


def test_without_openat2_files_are_still_checked(tmp_path: Path) -> None:
    """A kernel before 5.6 (no openat2): paths resolve under the root descriptor, and the
    same checks hold."""
    write(tmp_path / "cfg", "RemoteForward 1 x:1\n")
    os.mkfifo(tmp_path / "fifo")
    with RootFS(str(tmp_path), "/") as files:
        files._openat2 = False
        assert files.read("/cfg") == "RemoteForward 1 x:1\n"
        assert files.read("/missing") is None
        with pytest.raises(Unreadable, match="FIFO"):
            files.read("/fifo")


# --- when the config is read at all ---------------------------------------------------------

SSH_DIGEST = "ab" * 32
HOST = HostBinaries.of([("ssh", "/usr/bin/ssh", SSH_DIGEST, 1000)])


def wants(argv: list[str], policy_mode: str = "enforce", exe: str = "/usr/bin/ssh",
          sha256: str | None = None) -> bool:
    p = default_policy() if policy_mode == "enforce" else load_policy_text(
        "mode: monitor\nrules:\n  - {name: r, event: exec, action: kill, "
        "match: {ssh: [remote_forward]}}\n  - {name: l, event: exec, action: alert, "
        "match: {ssh: [local_forward]}}\n")
    return wants_ssh_config(p, HOST, agent=None, exe=exe, comm=os.path.basename(exe)[:15],
                            argv=argv, sha256=sha256)


def test_a_command_line_that_already_kills_is_judged_without_reading_configs() -> None:
    """The config can only add to a verdict: an `ssh -R` that its argv condemns under a kill
    rule is killed without waiting ~0.5 ms for the files (the userspace kill-latency path)."""
    assert not wants(["ssh", "-fNR", "9000:localhost:22", "h"])
    assert not wants(["ssh", "-o", "DynamicForward=1080", "h"])


def test_a_command_line_that_does_not_kill_reads_the_configs() -> None:
    assert wants(["ssh", "h"])  # an alias may carry a RemoteForward
    assert wants(["ssh", "-L", "1:x:1", "h"])  # alerted only: the config may add -R
    assert wants(["ssh", "-R", "1:x:1", "h"], policy_mode="monitor")  # nothing dies: all said


def test_only_ssh_reads_configs_and_a_copy_of_ssh_is_ssh() -> None:
    assert not wants(["ls", "-R"], exe="/bin/ls")
    assert not wants(["notssh", "h"], exe="/tmp/notssh")
    assert wants(["notssh", "h"], exe="/tmp/notssh", sha256=SSH_DIGEST)
