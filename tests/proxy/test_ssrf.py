"""The SSRF classifier (issue 15): addresses as values, names through a resolver the test
controls. Nothing here opens a connection."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from sidecar.proxy.origin_client import OriginRefused, is_private, resolve

REFUSED = [
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",  # noqa: S104 - a value for the classifier, never bound
    "0.1.2.3",
    "0.255.255.255",
    "169.254.169.254",
    "169.254.0.1",
    "100.100.100.200",
    "224.0.0.1",
    "239.1.1.1",
    "255.255.255.255",
    "240.0.0.1",
    "::1",
    "::",
    "fe80::1",
    "fe80::1%eth0",
    "fd00:ec2::254",
    "ff02::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:0.0.0.0",  # IPv4-mapped
    "::127.0.0.1",
    "::169.254.169.254",
    "::0.1.2.3",  # IPv4-compatible (deprecated)
    "64:ff9b::127.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::100.100.100.200",  # NAT64
    "64:ff9b:1::1",
    "64:ff9b:1:ffff::a9fe:a9fe",  # RFC 8215 local-use NAT64
    "2002:7f00:1::1",
    "2002:a9fe:a9fe::1",  # 6to4 around 127.0.0.1 / 169.254.169.254
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1 (obfuscated)
]
ALLOWED = [
    "8.8.8.8",
    "10.0.0.1",
    "192.168.1.1",
    "100.100.100.201",
    "1.0.0.0",
    "2001:db8::1",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
    "fd00:ec2::253",
    "::8.8.8.8",
]


@pytest.mark.parametrize("address", REFUSED)
def test_refused_addresses(address: str) -> None:
    assert is_private(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_allowed_addresses(address: str) -> None:
    assert not is_private(address)


def test_names_are_not_addresses() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        is_private("metadata.google.internal")


def resolver(table: dict[str, list[str]]) -> Any:
    async def lookup(host: str, port: int, **_: Any) -> list[Any]:
        family = {True: socket.AF_INET6, False: socket.AF_INET}
        return [
            (family[":" in a], socket.SOCK_STREAM, 6, "", (a, port)) for a in table.get(host, [])
        ]

    return lookup


@pytest.mark.parametrize(
    "address",
    ["fd00:ec2::254", "100.100.100.200", "64:ff9b::a9fe:a9fe", "0.0.0.7", "::ffff:127.0.0.1"],
)
async def test_a_name_resolving_only_to_refused_addresses_is_refused(address: str) -> None:
    lookup = resolver({"metadata.evil.test": [address]})
    with pytest.raises(OriginRefused):
        await resolve("metadata.evil.test", 443, False, lookup=lookup)
    assert await resolve("metadata.evil.test", 443, True, lookup=lookup) == [address]


async def test_refused_addresses_are_dropped_from_a_mixed_answer() -> None:
    lookup = resolver({"mixed.test": ["fd00:ec2::254", "203.0.113.7", "100.100.100.200"]})
    assert await resolve("mixed.test", 443, False, lookup=lookup) == ["203.0.113.7"]
