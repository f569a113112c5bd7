"""TLS client contexts, built once per config (file reads happen off the request path)."""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(ca_file: Path | None) -> ssl.SSLContext:
    """Verify servers against ``ca_file``, or the system CAs when None. TLS 1.2 at least."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ContextCache:
    """One context per CA file, so routes sharing a CA share pooled connections."""

    def __init__(self) -> None:
        self._contexts: dict[Path | None, ssl.SSLContext] = {}

    def get(self, ca_file: Path | None) -> ssl.SSLContext:
        context = self._contexts.get(ca_file)
        if context is None:
            context = self._contexts[ca_file] = client_context(ca_file)
        return context

    def contexts(self) -> list[ssl.SSLContext]:
        return list(self._contexts.values())
