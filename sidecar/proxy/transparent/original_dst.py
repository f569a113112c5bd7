"""SO_ORIGINAL_DST: the address an app's connection was going to before the nat table's
REDIRECT sent it to us (linux/netfilter_ipv4.h ``SO_ORIGINAL_DST`` = 80 at ``SOL_IP``;
linux/netfilter_ipv6/ip6_tables.h ``IP6T_SO_ORIGINAL_DST`` = 80 at ``SOL_IPV6``).

:func:`parse_sockaddr` is pure (the kernel's ``struct sockaddr_in`` / ``sockaddr_in6`` bytes);
:func:`original_dst` is the getsockopt edge.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IP = 0
SOL_IPV6 = 41
_SOCKADDR_IN6 = 28


class OriginalDst(NamedTuple):
    ip: str  # IPv6 without brackets, IPv4-mapped folded to IPv4
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


def parse_sockaddr(data: bytes) -> OriginalDst:
    """``struct sockaddr_in`` (16 bytes) or ``sockaddr_in6`` (28): family, port, address.
    Raises ValueError on anything else."""
    if len(data) < 8:
        raise ValueError("sockaddr too short")
    (family,) = struct.unpack_from("=H", data, 0)  # host byte order, as the kernel writes it
    (port,) = struct.unpack_from("!H", data, 2)
    if family == socket.AF_INET and len(data) >= 16:
        return OriginalDst(str(ipaddress.IPv4Address(data[4:8])), port)
    if family == socket.AF_INET6 and len(data) >= _SOCKADDR_IN6:
        address = ipaddress.IPv6Address(data[8:24])
        mapped = address.ipv4_mapped
        return OriginalDst(str(mapped or address), port)
    raise ValueError(f"unexpected sockaddr family {family} ({len(data)} bytes)")


def original_dst(sock: socket.socket) -> OriginalDst | None:
    """Where the connection was going; None if it was not redirected (no conntrack entry)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
        else:
            raw = sock.getsockopt(SOL_IP, SO_ORIGINAL_DST, 16)
        return parse_sockaddr(raw)
    except (OSError, ValueError):
        return None
