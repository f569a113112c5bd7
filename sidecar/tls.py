"""TLS client contexts, built once per config (file reads happen off the request path)."""

from __future__ import annotations

import hashlib
import ssl
import weakref
from pathlib import Path


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify servers against ``ca_file``, or the system CAs when None. TLS 1.2 at least."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _version(ca_file: Path | None) -> bytes | None:
    """What a context depends on: the CA file's content (the system store: nothing we watch)."""
    return None if ca_file is None else hashlib.sha256(ca_file.read_bytes()).digest()


class ContextCache:
    """One context per CA file, so routes sharing a CA share pooled connections.

    Built for each config; a context whose CA file has the same content as under the previous
    config is carried over (the same object): a reload then keeps the pooled connections made
    with it, instead of closing them all and building a new store (with the system CAs, about
    a megabyte of native memory each time, which glibc rarely gives back), and re-handshaking
    every upstream under load.

    Once sealed, a miss is a route or server of an older config still in flight just after a
    reload (its CA file is no longer configured): it gets the context its own config built,
    from the previous config's (held) or any older one still alive (weakly held), so no CA
    file is read and no store built on the event loop. Only when none is left is one built."""

    def __init__(self, previous: ContextCache | None = None) -> None:
        self._contexts: dict[Path | None, ssl.SSLContext] = {}
        self._versions: dict[Path | None, bytes | None] = {}
        self._previous = previous  # consulted while this config's contexts are built
        self._retired: dict[Path | None, ssl.SSLContext] = {}  # the previous config's, once sealed
        # Every context built by this cache's lineage and still referenced somewhere.
        self._alive: weakref.WeakValueDictionary[Path | None, ssl.SSLContext] = (
            previous._alive if previous is not None else weakref.WeakValueDictionary()
        )
        self._sealed = False

    def get(self, ca_file: Path | None) -> ssl.SSLContext:
        context = self._contexts.get(ca_file)
        if context is not None:
            return context
        if self._sealed:
            context = self._retired.get(ca_file) or self._alive.get(ca_file)
            if context is not None:
                return context
        version = _version(ca_file)
        previous = self._previous
        if (
            previous is not None
            and ca_file in previous._contexts
            and previous._versions[ca_file] == version
        ):
            context = previous._contexts[ca_file]
        else:
            context = client_context(ca_file)
            self._alive[ca_file] = context
        self._contexts[ca_file] = context
        self._versions[ca_file] = version
        return context

    def seal(self) -> ContextCache:
        """Built: keep only the previous config's contexts, not its cache (no chain of old
        configs is kept)."""
        if self._previous is not None:
            self._retired = {
                ca: ctx for ca, ctx in self._previous._contexts.items() if ca not in self._contexts
            }
        self._previous = None
        self._sealed = True
        return self

    def contexts(self) -> list[ssl.SSLContext]:
        return list(self._contexts.values())
