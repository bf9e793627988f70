"""Network addresses, one way everywhere: IPv4-mapped IPv6 folded to the IPv4 address it is,
the text form of a raw address from the kernel, and HOST:PORT parsing.

An agent may write 1.2.3.4 as ::ffff:1.2.3.4 and reach the same host, so every comparison
of a destination (policy networks, allow-lists, the kernel's tables, metrics' destination
class) folds first, with `fold` and `fold_network` from here. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import TypeAlias

Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")
"""Where IPv4-mapped IPv6 addresses live (RFC 4291 2.5.5.2)."""
_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def fold(ip: Address) -> Address:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def fold_network(net: Network) -> Network:
    """An IPv4-mapped IPv6 network (inside ::ffff:0:0/96) as the IPv4 network it is."""
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 \
            and net.subnet_of(MAPPED_V4):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF,
                                      net.prefixlen - 96))
    return net


def text_of(raw: bytes, v6: bool) -> str:
    """RFC 5952 text of a raw address (4 or 16 bytes, network order); IPv4-mapped as
    ::ffff:a.b.c.d, as Python 3.13+ prints it."""
    if not v6:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if raw[:12] == _MAPPED_PREFIX:
        return "::ffff:" + socket.inet_ntop(socket.AF_INET, raw[12:16])
    return str(ipaddress.IPv6Address(raw[:16]))


_HOST_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def split_host_port(text: str, *, port_zero: bool = False) -> tuple[str, int]:
    """("host", port) of "HOST:PORT" ("[::1]:9464" gives ("::1", 9464)).

    Raises ValueError, saying what is wrong, unless the host is an IPv4 address, a
    bracketed IPv6 address or a host name, and the port is 1..65535 (0..65535 with
    port_zero, where 0 asks the kernel for a free port).
    """
    low = 0 if port_zero else 1
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port (for example 127.0.0.1:9464, "
                         "[::1]:9464, or 0.0.0.0:9464 for every interface)")
    if not _PORT_RE.fullmatch(port_text) or not low <= int(port_text) <= 65535:
        raise ValueError(f"bad port {port_text!r} in {text!r}: use {low}..65535")
    if host.startswith("[") and host.endswith("]"):
        if not _is_ipv6(host[1:-1]):
            raise ValueError(f"{host} in {text!r} is not an IPv6 address")
        return host[1:-1], int(port_text)
    if ":" in host and _is_ipv6(host):
        raise ValueError(f"write the IPv6 address in {text!r} in brackets, "
                         f"as [{host}]:{port_text}")
    if not _HOST_RE.fullmatch(host) or len(host) > 253:
        raise ValueError(f"{host!r} in {text!r} is neither an IP address nor a host name")
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {text!r} is not an IPv4 address") from None
    return host, int(port_text)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True
