"""Egress without connect (issue 12): a datagram sent with an address (sendto, sendmsg,
sendmmsg, io_uring's sendmsg; IPv4, IPv6, IPv4-mapped through an IPv6 socket) meets the same
connect rules as a connect. Every sender is a real process of an agent, every listener a
real UDP socket on loopback: a denied datagram never reaches it (the send fails EPERM), a
killed sender dies before its datagram leaves, an allowed one arrives, and the same
datagram from a process that is not an agent arrives.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

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
from monitor.model.events import ConnectEvent
from monitor.policy.load import load_policy_text

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
