"""Static header secrets as a kind of credential: ``credential: header`` (API-key SaaS).

Each configured header is ``<name>: <prefix><file content>``; the file is a mounted secret
(a Kubernetes Secret volume), re-read when its stat version (inode, mtime, size) changes, so a
rotated key is used from the next check on without a restart. Per request nothing is read:
``ready`` hands out the values read at most :data:`RECHECK` seconds ago; after that one
``prepare`` stats the files off the event loop (and re-reads only those that changed).

A value must be a header field value that cannot split or end a header: visible ASCII with
inner spaces only (RFC 9110 §5.5 field-content without obs-text); surrounding whitespace (the
file's final newline) is dropped. A file that breaks the rule is refused with an error that
names the file, never its content. The app's own value of each header is stripped (or the
request refused with ``app_credentials: refuse``): an upstream that sees two may pick either.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config import StaticHeader
from sidecar.credentials.kind import Answer
from sidecar.errors import TokenUnavailable
from sidecar.routing import Route
from sidecar.secret import Secret

audit = logging.getLogger("sidecar.audit")

RECHECK = 2.0  # seconds between stat checks of a route's secret files
_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")

Version = tuple[int, int, int]


# -- pure --------------------------------------------------------------------------------------


def header_value(text: str) -> str | None:
    """The secret a file holds, or None when it is empty or not header-safe."""
    value = text.strip(" \t\r\n")
    return value if _VALUE.fullmatch(value) else None


def header_lines(headers: Sequence[StaticHeader], values: Sequence[str]) -> str:
    """``Name: prefix+value`` lines, CRLF-terminated (values checked by :func:`header_value`)."""
    return "".join(
        f"{h.name}: {h.prefix}{value}\r\n" for h, value in zip(headers, values, strict=True)
    )


# -- I/O edge ----------------------------------------------------------------------------------


class SecretFiles:
    """Reads secret files off the event loop; a file is re-read only when its version changed.
    Shared by every route (two routes naming one file read it once)."""

    def __init__(self, observe: Callable[[str, str], None] | None = None) -> None:
        self._files: dict[Path, tuple[Version, Secret]] = {}
        self._observe = observe or (lambda kind, outcome: None)

    async def read(self, path: Path, route: str) -> tuple[Secret, bool]:
        """The file's value and whether it was unchanged since the last read."""
        try:
            return await asyncio.to_thread(self._read, path)
        except OSError as exc:
            self._observe("header", "unavailable")
            raise TokenUnavailable(
                f"cannot read the secret file {path} ({exc.strerror or type(exc).__name__})",
                route=route,
            ) from exc
        except ValueError as exc:
            self._observe("header", "rejected")
            raise TokenUnavailable(
                f"the secret file {path} {exc}; refusing it (its content is not shown)",
                route=route,
            ) from exc

    def _read(self, path: Path) -> tuple[Secret, bool]:
        stat = path.stat()
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._files.get(path)
        if cached is not None and cached[0] == version:
            return cached[1], True
        if stat.st_size > 64 * 1024:  # a header value, not a file to hold in memory
            raise ValueError("is larger than 64 KiB")
        value = header_value(path.read_text(encoding="utf-8", errors="replace"))
        if value is None:
            raise ValueError(
                "is empty or holds characters a header cannot carry (line breaks inside the "
                "value, control characters, non-ASCII)"
            )
        secret = Secret(value)
        self._files[path] = (version, secret)
        self._observe("header", "ok")
        return secret, False


@dataclass(frozen=True)
class Held:
    lines: Secret  # the header lines, ready to send
    checked_at: float  # when the files were last stat'ed (monotonic)


class StaticHeaders:
    """``credential: header`` for one route (its header names are what it strips)."""

    wants_body_digest = False

    def __init__(
        self,
        route: Route,
        files: SecretFiles,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._headers = route.destination.headers
        self._files = files
        self._clock = clock
        self.strips = frozenset(h.name.lower() for h in self._headers)
        self._names = ",".join(h.name for h in self._headers)
        self._held: Held | None = None
        self.last_error: str | None = None  # why the last read failed (readiness)
        self._lock = asyncio.Lock()

    @property
    def loaded(self) -> bool:
        return self._held is not None

    def ready(self, route: Route, scopes: tuple[str, ...]) -> Held | None:
        held = self._held
        if held is not None and self._clock() - held.checked_at < RECHECK:
            return held
        return None

    async def prepare(self, route: Route, scopes: tuple[str, ...]) -> tuple[Held, bool]:
        async with self._lock:  # single flight: one stat round per route at a time
            held = self.ready(route, scopes)
            if held is not None:
                return held, True
            try:
                read = [await self._files.read(h.file, route.name) for h in self._headers]
            except TokenUnavailable as exc:
                self._held = None  # fail closed: a removed or broken file is not served
                self.last_error = exc.detail
                raise
            self.last_error = None
            unchanged = self._held is not None and all(same for _, same in read)
            lines = header_lines(self._headers, [secret.reveal() for secret, _ in read])
            self._held = Held(Secret(lines), self._clock())
            if not unchanged:
                audit.info(
                    "header secrets loaded",
                    extra={
                        "event": "credential_loaded",
                        "route": route.name,
                        "kind": "header",
                        "headers": self._names,
                    },
                )
            return self._held, unchanged

    def reference(self, held: Held) -> Mapping[str, Any]:
        return {"kind": "header", "headers": self._names}

    def header_lines(
        self,
        held: Held,
        method: str,
        origin: str,
        path: str,
        query: str,
        headers: Sequence[tuple[str, str]],
        body_digest: str | None,
    ) -> str:
        return held.lines.reveal()

    def learn(self, origin: str, answer: Answer) -> None:
        return None

    def retry_reason(self, answer: Answer) -> str | None:
        return None  # a static secret is the same on a second attempt

    async def again(self, held: Held, route: Route, scopes: tuple[str, ...], reason: str) -> Held:
        return held
