"""A fault proxy of our own: a byte relay in front of a peer whose misbehaviour is switched at run
time. TCP (the AS, the upstream API) and unix sockets (the Workload API) alike.

Faults, as the sidecar would meet them in the field:

  pass      relay both ways
  delay     hold each chunk of the answer ``delay`` seconds (a slow peer: its answers leave
            late, so what it stamped on them is ``delay`` old on arrival; a new TLS connection
            pays it on the handshake too)
  stall     accept and relay the client's bytes, never answer (a hung peer); on recovery the
            held answers flow again, as from a peer that un-freezes
  trickle   answer one byte per ``interval`` (a peer on a dying link)
  reset     RST every connection, open or new (SO_LINGER 0, then close)
  refuse    close the listener and every open connection (the peer is gone: ECONNREFUSED,
            ENOENT for a unix socket)
  garbage   answer random bytes instead of the peer's (a wrong service on the port)

Relaying is TLS-agnostic: the bytes pass through, so the sidecar's TLS is end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

_CHUNK = 65536


class Fault(enum.Enum):
    PASS = "pass"
    DELAY = "delay"
    STALL = "stall"
    TRICKLE = "trickle"
    RESET = "reset"
    REFUSE = "refuse"
    GARBAGE = "garbage"


@dataclass
class FaultStats:
    """What the proxy did, by fault: tests and reports read these instead of timing."""

    accepted: int = 0
    open: int = 0
    reset: int = 0  # connection ends aborted with RST
    held: int = 0  # chunks held back by a stall
    delayed: int = 0
    trickled: int = 0  # bytes sent one at a time
    garbled: int = 0  # chunks replaced by random bytes


@dataclass(eq=False)  # identity-hashed: links live in a set
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class FaultProxy:
    """Listen on loopback TCP (``listen_path`` None) or a unix socket, relay to ``target``:
    ``(host, port)`` or a unix socket path."""

    def __init__(self, target: tuple[str, int] | Path, *, listen_path: Path | None = None) -> None:
        self.target = target
        self.listen_path = listen_path
        self.port = 0
        self.fault = Fault.PASS
        self.delay = 0.5
        self.interval = 0.2
        self.stats = FaultStats()
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self.holding = asyncio.Event()  # set once a stall has held back an answer
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    # -- lifecycle ----------------------------------------------------------------------------
    async def __aenter__(self) -> FaultProxy:
        await self._listen()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close everything and wait for every relay to end (none is cancelled: asyncio's
        stream server reports a cancelled connection handler as an error)."""
        self._closing.set()
        await self._close_listener()
        async with self._changed:
            self._changed.notify_all()
        tasks = [task for link in self._links for task in link.tasks]
        for link in list(self._links):
            self._abort(link, rst=False)
        if tasks:
            await asyncio.wait(tasks)

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` or ``unix:///path`` — what a client is configured with."""
        if self.listen_path is not None:
            return f"unix://{self.listen_path}"
        return f"127.0.0.1:{self.port}"

    async def _listen(self) -> None:
        if self.listen_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.listen_path.unlink()
            self._server = await asyncio.start_unix_server(self._accept, path=self.listen_path)
            return
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self.listen_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.listen_path.unlink()

    # -- control ------------------------------------------------------------------------------
    async def set(
        self, fault: Fault, *, delay: float | None = None, interval: float | None = None
    ) -> None:
        """Switch the fault; open connections follow it from their next chunk on."""
        if delay is not None:
            self.delay = delay
        if interval is not None:
            self.interval = interval
        previous, self.fault = self.fault, fault
        if fault is Fault.REFUSE and previous is not Fault.REFUSE:
            await self._close_listener()
        if fault in (Fault.REFUSE, Fault.RESET):
            for link in list(self._links):
                self._abort(link, rst=fault is Fault.RESET)
        if previous is Fault.REFUSE and fault is not Fault.REFUSE:
            await self._listen()
        async with self._changed:
            self._changed.notify_all()

    # -- relaying -----------------------------------------------------------------------------
    def _turned_away(self) -> bool:
        """New connections are not relayed (a method: the fault changes across awaits)."""
        return self.fault in (Fault.RESET, Fault.REFUSE) or self._closing.is_set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        link = _Link(writer)
        if self._turned_away():
            self._abort(link, rst=True)
            return
        try:
            if isinstance(self.target, Path):
                up_reader, up_writer = await asyncio.open_unix_connection(self.target)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._abort(link, rst=True)
            return
        link.server = up_writer
        if self._turned_away():  # the fault switched while we dialled
            self._abort(link, rst=self.fault is Fault.RESET)
            up_writer.close()
            return
        self._links.add(link)
        self.stats.open += 1
        handler = asyncio.current_task()
        answer = asyncio.ensure_future(self._pump(up_reader, writer, link, toward_client=True))
        link.tasks += [answer] if handler is None else [handler, answer]
        try:
            await self._pump(reader, up_writer, link, toward_client=False)
            await answer
        finally:
            self._links.discard(link)
            self.stats.open -= 1
            for end in (writer, up_writer):
                end.close()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        link: _Link,
        *,
        toward_client: bool,
    ) -> None:
        # RuntimeError: uvloop's answer to a write on a transport another pump just aborted.
        with contextlib.suppress(OSError, RuntimeError, asyncio.IncompleteReadError):
            while True:
                data = await source.read(_CHUNK)
                if not data:
                    break
                if not await self._deliver(data, sink, link, toward_client=toward_client):
                    return
            with contextlib.suppress(OSError, RuntimeError):
                if sink.can_write_eof():
                    sink.write_eof()

    async def _deliver(
        self, data: bytes, sink: asyncio.StreamWriter, link: _Link, *, toward_client: bool
    ) -> bool:
        """Forward one chunk under the fault in force now; False once the link is dead."""
        while True:
            fault = self.fault
            if self._closing.is_set():
                return False
            if fault in (Fault.RESET, Fault.REFUSE):
                self._abort(link, rst=fault is Fault.RESET)
                return False
            if fault is Fault.STALL and toward_client:
                self.stats.held += 1
                self.holding.set()
                async with self._changed:
                    await self._changed.wait_for(
                        lambda: self.fault is not Fault.STALL or self._closing.is_set()
                    )
                continue
            if fault is Fault.DELAY and toward_client:
                self.stats.delayed += 1
                await self._pause(self.delay)
            elif fault is Fault.GARBAGE and toward_client:
                self.stats.garbled += 1
                data = os.urandom(len(data))
            elif fault is Fault.TRICKLE and toward_client:
                return await self._trickle(data, sink)
            sink.write(data)
            await sink.drain()
            return True

    async def _trickle(self, data: bytes, sink: asyncio.StreamWriter) -> bool:
        for index in range(len(data)):
            self.stats.trickled += 1
            sink.write(data[index : index + 1])
            await sink.drain()
            if self.fault is not Fault.TRICKLE:  # recovered: the rest at full speed
                sink.write(data[index + 1 :])
                await sink.drain()
                break
            await self._pause(self.interval)
        return True

    async def _pause(self, seconds: float) -> None:
        """Sleep, but not past the proxy's closing."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _abort(self, link: _Link, *, rst: bool) -> None:
        for end in (link.client, link.server):
            if end is None or end.transport.is_closing():
                continue
            if rst:
                _linger_zero(end)
                self.stats.reset += 1
            end.transport.abort()


def _linger_zero(writer: asyncio.StreamWriter) -> None:
    """SO_LINGER {on, 0}: close() sends RST instead of FIN (for TCP; unix sockets just close)."""
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
