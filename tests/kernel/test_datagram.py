"""Egress without connect (issue 12): a datagram sent with an address (sendto, sendmsg,
sendmmsg, io_uring's sendmsg; IPv4, IPv6, IPv4-mapped through an IPv6 socket) meets the same
connect rules as a connect. Every sender is a real process of an agent, every listener a
real UDP socket on loopback: a denied datagram never reaches it (the send fails EPERM), a
killed sender dies before its datagram leaves, an allowed one arrives, and the same
datagram from a process that is not an agent arrives.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    AGENT_UID,
    Running,
    agent_exec,
    free_port,
    require_root,
    start_as_agent,
    wait_exit,
)

from monitor.config.load import load_config_text
from monitor.model.errors import ControlError
from monitor.model.events import ConnectEvent
from monitor.policy.load import load_policy_text
from monitor.service import client

SOCK = "/run/agentwatch-test/dgram.sock"
PAYLOAD = b"dgram-payload"


def free_udp_port() -> int:
    """A loopback port free for TCP and for UDP on 127.0.0.1 and ::1."""
    while True:
        port = free_port()
        try:
            for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                with socket.socket(fam, socket.SOCK_DGRAM) as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port


ALLOWED = free_udp_port()
DENIED = free_udp_port()

POLICY = f"""
mode: enforce
agents:
  - name: hostile
    match:
      - uid: {AGENT_UID}
  - name: dgkill
    match:
      - comm: awdgkill
rules:
  - name: dgram-allow-list
    event: connect
    agents: [hostile]
    action: deny
    match:
      outside:
        address: [127.0.0.1, "::1"]
        port: [{ALLOWED}]
  - name: dgram-allow-list-kill
    event: connect
    agents: [dgkill]
    action: kill
    match:
      outside:
        address: [127.0.0.1, "::1"]
        port: [{ALLOWED}]
"""

# argv: family (4 or 6), destination, port, how. Prints what became of the send.
SENDER = textwrap.dedent("""
    import ctypes, socket, sys
    fam, host, port, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    family = socket.AF_INET6 if fam == "6" else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    data, dest = b"dgram-payload", (host, port)

    def sendmmsg():
        libc = ctypes.CDLL(None, use_errno=True)
        if family == socket.AF_INET:
            raw = (socket.AF_INET.to_bytes(2, "little") + port.to_bytes(2, "big")
                   + socket.inet_pton(family, host) + bytes(8))
        else:
            raw = (socket.AF_INET6.to_bytes(2, "little") + port.to_bytes(2, "big")
                   + bytes(4) + socket.inet_pton(family, host) + bytes(4))
        name = ctypes.create_string_buffer(raw, len(raw))
        buf = ctypes.create_string_buffer(data, len(data))
        class IOVec(ctypes.Structure):
            _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
        class MsgHdr(ctypes.Structure):
            _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32),
                        ("iov", ctypes.POINTER(IOVec)), ("iovlen", ctypes.c_size_t),
                        ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                        ("flags", ctypes.c_int)]
        class MMsgHdr(ctypes.Structure):
            _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]
        iov = IOVec(ctypes.addressof(buf), len(data))
        vec = (MMsgHdr * 2)()
        for m in vec:
            m.hdr = MsgHdr(ctypes.addressof(name), len(raw), ctypes.pointer(iov), 1, None, 0, 0)
        n = libc.sendmmsg(s.fileno(), vec, 2, 0)
        if n < 0:
            e = ctypes.get_errno()
            raise OSError(e, "sendmmsg")

    try:
        if how == "sendto":
            s.sendto(data, dest)
        elif how == "sendmsg":
            s.sendmsg([data], [], 0, dest)
        elif how == "sendmmsg":
            sendmmsg()
        elif how == "connected-then-sendto":  # connected to an allowed port, then elsewhere
            s.connect((host, int(sys.argv[5])))
            s.sendto(data, dest)
        elif how == "connect":
            s.connect(dest)
            s.send(data)
        print("sent", flush=True)
    except PermissionError:
        print("EPERM", flush=True)
""")




@pytest.fixture(scope="module")
def uring() -> Iterator[str]:
    """The io_uring sender, built where the agent user can run it."""
    d = Path(tempfile.mkdtemp(prefix="aw-dgram-", dir="/tmp"))
    d.chmod(0o755)
    src = Path(__file__).with_name("uring_send.c")
    subprocess.run(["cc", "-O2", "-o", str(d / "uring"), str(src)], check=True)
    yield str(d / "uring")
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def mon() -> Iterator[Running]:
    require_root()
    cfg = load_config_text("monitor: {tick_seconds: 0.25}\n", "<dgram-tests>")
    r = Running(cfg, SOCK, load_policy_text(POLICY, "<dgram policy>")).start()
    yield r
    r.stop()


class Listener:
    """A UDP socket on loopback that says what reached it."""

    def __init__(self, family: socket.AddressFamily, host: str, port: int) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((host, port))

    def received(self, wait: float = 0.3) -> list[bytes]:
        """Everything queued (loopback delivers inside the sender's send call, so what was
        sent by a process that has exited is here already; `wait` is a margin)."""
        got = []
        while select.select([self.sock], [], [], wait)[0]:
            got.append(self.sock.recv(2048))
            wait = 0.05
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listeners() -> Iterator[dict[tuple[str, int], Listener]]:
    made = {}
    for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        for port in (ALLOWED, DENIED):
            made[(host, port)] = Listener(fam, host, port)
    yield made
    for lst in made.values():
        lst.close()


def send_as_agent(fam: str, host: str, port: int, how: str, *extra: str
                  ) -> tuple[int, str, int]:
    """(exit status, what the sender printed, its pid)."""
    p = start_as_agent([sys.executable, "-c", SENDER, fam, host, str(port), how, *extra],
                       stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=30)
    return p.returncode, out.decode().strip(), p.pid


def send_plainly(fam: str, host: str, port: int, how: str) -> str:
    out = subprocess.run([sys.executable, "-c", SENDER, fam, host, str(port), how],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


# (socket family, destination as the sender writes it, the listener it reaches)
SPELLINGS = [
    ("4", "127.0.0.1", "127.0.0.1"),
    ("6", "::1", "::1"),
    ("6", "::ffff:127.0.0.1", "127.0.0.1"),  # IPv4 through an IPv6 socket
]
HOWS = ["sendto", "sendmsg", "sendmmsg"]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("fam,dest,lands", SPELLINGS, ids=["ipv4", "ipv6", "v4-mapped"])
def test_a_datagram_outside_the_allow_list_is_refused_before_it_leaves(
        mon: Running, listeners: dict[tuple[str, int], Listener], fam: str, dest: str,
        lands: str, how: str) -> None:
    rc, out, pid = send_as_agent(fam, dest, DENIED, how)
    assert (rc, out) == (0, "EPERM")
    assert listeners[(lands, DENIED)].received() == [], "a denied datagram arrived"
    where = f"[{lands}]:{DENIED}" if ":" in lands else f"{lands}:{DENIED}"
    v = mon.wait_verdict(rule="dgram-allow-list", pid=pid)
    assert v["outcome"] == "refused in the kernel" and v["destination"] == where
    assert v["reason"] == f"datagram to {where} (enforced in the kernel)"
    # a process that is not an agent sends the same datagram: it arrives
    assert send_plainly(fam, dest, DENIED, how) == "sent"
    assert PAYLOAD in listeners[(lands, DENIED)].received()


@pytest.mark.parametrize("fam,dest,lands", SPELLINGS, ids=["ipv4", "ipv6", "v4-mapped"])
def test_a_datagram_inside_the_allow_list_arrives_and_is_reported_as_a_send(
        mon: Running, listeners: dict[tuple[str, int], Listener], fam: str, dest: str,
        lands: str) -> None:
    rc, out, pid = send_as_agent(fam, dest, ALLOWED, "sendto")
    assert (rc, out) == (0, "sent")
    assert listeners[(lands, ALLOWED)].received() == [PAYLOAD]
    ev, agent = mon.log.wait_for(lambda e, a: isinstance(e, ConnectEvent) and e.h.pid == pid)
    assert isinstance(ev, ConnectEvent) and agent == "hostile"
    assert ev.send and ev.transport == "udp" and ev.port == ALLOWED
    assert not mon.verdicts(pid=pid)


def test_a_kill_rule_kills_the_sender_and_nothing_arrives(
        mon: Running, listeners: dict[tuple[str, int], Listener]) -> None:
    p = agent_exec([sys.executable, "-c", SENDER, "4", "127.0.0.1", str(DENIED), "sendto"],
                   agent="dgkill", socket=SOCK, stdout=subprocess.PIPE)
    assert wait_exit(p) == -signal.SIGKILL
    assert p.stdout is not None and p.stdout.read() == b""
    assert listeners[("127.0.0.1", DENIED)].received() == []
    v = mon.wait_verdict(rule="dgram-allow-list-kill", pid=p.pid)
    assert v["outcome"] == "killed in the kernel"
    assert v["reason"] == f"datagram to 127.0.0.1:{DENIED} (enforced in the kernel)"


def test_a_connected_socket_is_still_judged_at_connect_and_at_each_addressed_send(
        mon: Running, listeners: dict[tuple[str, int], Listener]) -> None:
    # connect() to a denied destination: the connect hook refuses it, as before
    rc, out, pid = send_as_agent("4", "127.0.0.1", DENIED, "connect")
    assert (rc, out) == (0, "EPERM")
    v = mon.wait_verdict(rule="dgram-allow-list", pid=pid)
    assert v["reason"] == f"connect to 127.0.0.1:{DENIED} (enforced in the kernel)"
    # connected to an allowed destination, then a sendto that names another one
    rc, out, pid = send_as_agent("4", "127.0.0.1", DENIED, "connected-then-sendto",
                                 str(ALLOWED))
    assert (rc, out) == (0, "EPERM")
    v = mon.wait_verdict(rule="dgram-allow-list", pid=pid)
    assert str(v["reason"]).startswith("datagram to ")
    assert listeners[("127.0.0.1", DENIED)].received() == []
    assert send_plainly("4", "127.0.0.1", DENIED, "connect") == "sent"
    assert listeners[("127.0.0.1", DENIED)].received() == [PAYLOAD]


def test_untracked_datagrams_emit_nothing(mon: Running,
                                          listeners: dict[tuple[str, int], Listener]) -> None:
    p = subprocess.run([sys.executable, "-c", SENDER, "4", "127.0.0.1", str(ALLOWED),
                        "sendto"], capture_output=True, text=True, timeout=30, check=True)
    assert p.stdout.strip() == "sent"
    assert listeners[("127.0.0.1", ALLOWED)].received() == [PAYLOAD]
    assert not [e for e, _ in mon.log.snapshot()
                if isinstance(e, ConnectEvent) and e.port == ALLOWED and e.h.session == 0]


@pytest.mark.parametrize("op", ["sendmsg", "send_zc"])
@pytest.mark.parametrize("fam,dest,lands", SPELLINGS, ids=["ipv4", "ipv6", "v4-mapped"])
def test_a_datagram_sent_through_io_uring_meets_the_same_rules(
        mon: Running, listeners: dict[tuple[str, int], Listener], uring: str, op: str,
        fam: str, dest: str, lands: str) -> None:
    p = start_as_agent([uring, fam, dest, str(DENIED), op], stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=30)
    assert (p.returncode, out.decode().strip()) == (0, "EPERM")
    assert listeners[(lands, DENIED)].received() == []
    v = mon.wait_verdict(rule="dgram-allow-list", pid=p.pid)
    assert str(v["reason"]).startswith("datagram to ")
    plain = subprocess.run([uring, fam, dest, str(DENIED), op], capture_output=True,
                           text=True, timeout=30, check=True)
    assert plain.stdout.strip() == "sent"
    assert PAYLOAD in listeners[(lands, DENIED)].received()


TFO = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
    try:
        s.sendto(b"dgram-payload", socket.MSG_FASTOPEN, (sys.argv[1], int(sys.argv[2])))
        print("sent", flush=True)
    except PermissionError:
        print("EPERM", flush=True)
""")


@pytest.mark.parametrize("dest,host", [("127.0.0.1", "127.0.0.1"), ("::1", "::1"),
                                       ("::ffff:127.0.0.1", "127.0.0.1")])
def test_tcp_fast_open_data_in_the_syn_meets_the_connect_rules(mon: Running, dest: str,
                                                               host: str) -> None:
    """sendto(MSG_FASTOPEN) connects and sends in one call, without connect(): the kernel
    runs the connect hook as its pre-connect step."""
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    srv.bind((host, DENIED))
    srv.listen()
    srv.settimeout(0.5)
    try:
        p = start_as_agent([sys.executable, "-c", TFO, dest, str(DENIED)],
                           stdout=subprocess.PIPE)
        out, _ = p.communicate(timeout=30)
        assert out.decode().strip() == "EPERM"
        with pytest.raises(TimeoutError):
            srv.accept()
        v = mon.wait_verdict(rule="dgram-allow-list", pid=p.pid)
        assert str(v["reason"]).startswith("connect to ")
        plain = subprocess.run([sys.executable, "-c", TFO, dest, str(DENIED)],
                               capture_output=True, text=True, timeout=30, check=True)
        assert plain.stdout.strip() == "sent"
        conn, _ = srv.accept()
        conn.settimeout(2)
        assert conn.recv(64) == PAYLOAD
        conn.close()
    finally:
        srv.close()


# --- sockets whose datagrams no hook sees ---------------------------------------------------

PING = textwrap.dedent("""
    import socket, struct, sys
    six = ":" in sys.argv[1]
    try:
        s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM,
                          socket.IPPROTO_ICMPV6 if six else socket.IPPROTO_ICMP)
        s.settimeout(2)
        s.sendto(struct.pack("!BBHHH", 128 if six else 8, 0, 0, 0, 1) + b"dgram-payload",
                 (sys.argv[1], 0))
        print("echoed" if s.recv(128).endswith(b"dgram-payload") else "sent", flush=True)
    except PermissionError:
        print("EPERM", flush=True)
""")

RAW_UDP = textwrap.dedent("""
    import socket, struct, sys
    port = int(sys.argv[1])
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        s.sendto(struct.pack("!HHHH", 40000, port, 8 + 13, 0) + b"dgram-payload",
                 ("127.0.0.1", 0))
        print("sent", flush=True)
    except PermissionError:
        print("EPERM", flush=True)
""")


@pytest.fixture
def ping_sockets() -> Iterator[None]:
    """Unprivileged ICMP sockets allowed for every group (as systemd's defaults do)."""
    knob = Path("/proc/sys/net/ipv4/ping_group_range")
    old = knob.read_text()
    knob.write_text("0 2147483647")
    yield
    knob.write_text(old)


@pytest.mark.parametrize("dest", ["127.0.0.1", "::1"])
def test_an_agent_under_an_allow_list_cannot_open_an_icmp_socket(
        mon: Running, ping_sockets: None, dest: str) -> None:
    """An ICMP echo carries a payload to any address and passes no connect or sendmsg
    hook: the allow-list refuses the socket itself."""
    p = start_as_agent([sys.executable, "-c", PING, dest], stdout=subprocess.PIPE)
    out, _ = p.communicate(timeout=30)
    assert (p.returncode, out.decode().strip()) == (0, "EPERM")
    v = mon.wait_verdict(rule="dgram-allow-list", pid=p.pid)
    assert v["outcome"] == "refused in the kernel" and v["destination"] is None
    assert str(v["reason"]).startswith("opened a raw or ICMP socket")
    plain = subprocess.run([sys.executable, "-c", PING, dest], capture_output=True, text=True,
                           timeout=30, check=True)
    assert plain.stdout.strip() == "echoed"


def test_a_raw_socket_under_a_kill_allow_list_kills_its_opener(
        mon: Running, listeners: dict[tuple[str, int], Listener]) -> None:
    p = agent_exec([sys.executable, "-c", RAW_UDP, str(DENIED)], agent="dgkill", socket=SOCK,
                   stdout=subprocess.PIPE)
    assert wait_exit(p) == -signal.SIGKILL
    assert listeners[("127.0.0.1", DENIED)].received() == []
    v = mon.wait_verdict(rule="dgram-allow-list-kill", pid=p.pid)
    assert v["outcome"] == "killed in the kernel"
    plain = subprocess.run([sys.executable, "-c", RAW_UDP, str(DENIED)], capture_output=True,
                           text=True, timeout=30, check=True)
    assert plain.stdout.strip() == "sent"
    assert listeners[("127.0.0.1", DENIED)].received() == [PAYLOAD]


# --- pinned: the hooks outlive the monitor, and detach removes them -------------------------

CLI = [sys.executable, "-m", "monitor.cli.main"]


def test_pinned_datagram_hooks_hold_while_the_monitor_is_gone_and_detach_removes_them(
        reachable_tmp: Path, listeners: dict[tuple[str, int], Listener]) -> None:
    require_root()
    pin = f"/sys/fs/bpf/awtest-dgram-{os.getpid()}"
    sock = str(reachable_tmp / "ctl.sock")
    config, policy = reachable_tmp / "config.yaml", reachable_tmp / "policy.yaml"
    config.write_text(f"monitor:\n  control_socket: {sock}\n  pin_dir: {pin}\n"
                      f"metrics: {{listen: '127.0.0.1:{free_port()}'}}\n")
    # its own agent user, so that the module's monitor (when running) does not judge it
    policy.write_text(POLICY.replace(f"uid: {AGENT_UID}", f"uid: {PIN_UID}"))
    log = reachable_tmp / "monitor.log"
    mon = subprocess.Popen([*CLI, "run", "--config", str(config), "--policy", str(policy)],
                           stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:  # up once it answers (probes attached, policy in the kernel)
            try:
                client.request(sock, {"op": "ping"}, timeout=2)
                break
            except ControlError:
                assert mon.poll() is None and time.monotonic() < deadline, \
                    log.read_text()[-2000:]
                time.sleep(0.1)
        assert {p.name.split("@")[0] for p in Path(pin, "links").iterdir()} >= {
            "cgroup-aw_sendmsg4", "cgroup-aw_sendmsg6", "cgroup-aw_sock_create"}
        mon.send_signal(signal.SIGKILL)
        mon.wait()
        # the gap: no monitor; the kernel still makes the agent and refuses its datagram
        for fam, dest, lands in SPELLINGS:
            assert send_as(PIN_UID, fam, dest, DENIED) == "EPERM"
            assert listeners[(lands, DENIED)].received() == []
    finally:
        if mon.poll() is None:
            mon.kill()
            mon.wait()
        out = subprocess.run([*CLI, "detach", "--pin-dir", pin], capture_output=True,
                             text=True, timeout=30)
    assert out.returncode == 0 and not os.path.exists(pin), out
    # detached: nothing judges that datagram any more
    assert send_as(PIN_UID, "4", "127.0.0.1", DENIED) == "sent"
    assert listeners[("127.0.0.1", DENIED)].received() == [PAYLOAD]


PIN_UID = AGENT_UID - 1  # the pinned test's agent user (no passwd entry needed)


def send_as(uid: int, fam: str, host: str, port: int) -> str:
    out = subprocess.run([sys.executable, "-c", SENDER, fam, host, str(port), "sendto"],
                         user=uid, group=uid, extra_groups=[], capture_output=True,
                         text=True, timeout=30, check=True)
    return out.stdout.strip()
