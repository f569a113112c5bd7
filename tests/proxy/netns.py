"""Real kernel networking for the transparent-capture tests: network namespaces of their own.

Layout per test (every address exists only inside the two namespaces it creates):

    app ns   lo (the dev stack, the sidecar), veth 10.231.<n>.1/24  -- the app runs here
    peer ns  veth 10.231.<n>.2/24                                   -- "the internet"

``/etc/netns/<app>/hosts`` (bind-mounted over /etc/hosts by ``ip netns exec``) points the test
names at the peer address, so the apps resolve them as they would in a pod. The test process
enters the app namespace for its own sockets with ``setns(2)`` on its thread (and the peer one
for a moment, to bind a server there); apps run through ``ip netns exec`` as an unprivileged
uid that the rules capture. Everything is removed in ``finally``, even on failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
APP_UID = 4242  # the app's uid: captured (the sidecar here is uid 0, excluded)
_counter = itertools.count(1)
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)  # noqa: S603, S607


def unavailable() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) to create network namespaces"
    for tool in ("ip", "iptables-restore", "iptables-save", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    name = f"sct-probe-{os.getpid()}"
    try:
        _ip("netns", "add", name)
        _ip("netns", "del", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"the kernel refuses network namespaces here ({exc})"
    return None


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


@dataclass
class Namespaces:
    app: str
    peer: str
    app_ip: str
    peer_ip: str
    hosts_dir: Path
    app_ip6: str = ""
    peer_ip6: str = ""

    @contextlib.contextmanager
    def inside(self, name: str) -> Iterator[None]:
        """This thread's new sockets are created in namespace ``name`` meanwhile."""
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(f"/run/netns/{name}")
            yield
        finally:
            try:
                if _libc.setns(original, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
            finally:
                os.close(original)

    def listen_in_peer(self, port: int, *, ipv6: bool = False) -> socket.socket:
        """A listening TCP socket on the peer address (bound inside the peer namespace)."""
        with self.inside(self.peer):
            sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.peer_ip6 if ipv6 else self.peer_ip, port))
            sock.listen(16)
            sock.setblocking(False)
        return sock

    def app_command(self, *argv: str) -> list[str]:
        """``argv`` as the app: in the app namespace, as APP_UID, no proxy settings."""
        return [
            "ip", "netns", "exec", self.app,
            "setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}", "--clear-groups",
            *argv,
        ]  # fmt: skip

    def root_command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.app, *argv]


APP_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}


@contextlib.contextmanager
def namespaces(names: tuple[str, ...], names6: tuple[str, ...] = ()) -> Iterator[Namespaces]:
    """Two namespaces joined by a veth pair; ``names`` resolve to the peer address (app side)."""
    n = next(_counter) + (os.getpid() % 200) * 10
    subnet = f"10.231.{n % 250}"
    tag = f"{os.getpid() % 100000}x{n}"
    app, peer = f"sct-app-{tag}", f"sct-peer-{tag}"
    veth_app, veth_peer = f"sca{tag}"[:15], f"scp{tag}"[:15]
    hosts_dir = Path("/etc/netns") / app
    prefix = f"fd00:231:{n % 250:x}"
    spaces = Namespaces(
        app, peer, f"{subnet}.1", f"{subnet}.2", hosts_dir, f"{prefix}::1", f"{prefix}::2"
    )
    created: list[str] = []
    try:
        for name in (app, peer):
            _ip("netns", "add", name)
            created.append(name)
        _ip("link", "add", veth_app, "netns", app, "type", "veth", "peer", veth_peer, "netns", peer)
        for name, dev, address, address6 in (
            (app, veth_app, spaces.app_ip, spaces.app_ip6),
            (peer, veth_peer, spaces.peer_ip, spaces.peer_ip6),
        ):
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", dev)
            # nodad: usable at once (no duplicate address detection on a two-node link)
            _ip("-n", name, "addr", "add", f"{address6}/64", "dev", dev, "nodad")
            _ip("-n", name, "link", "set", dev, "up")
        hosts_dir.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", *(f"{spaces.peer_ip} {host}" for host in names)]
        lines += [f"{spaces.peer_ip6} {host}" for host in names6]
        (hosts_dir / "hosts").write_text("\n".join(lines) + "\n", encoding="ascii")
        yield spaces
    finally:
        shutil.rmtree(hosts_dir, ignore_errors=True)
        for name in created:  # deleting a namespace deletes its veth end, rules and all
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)  # noqa: S603, S607
