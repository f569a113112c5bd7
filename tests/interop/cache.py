"""Where the interop suites find what `make keycloak` / `make spire` fetched and built.

The cache lives outside the clone so a fresh clone on the same machine (CI) reuses it:
``$SIDECAR_INTEROP_CACHE``, else ``${XDG_CACHE_HOME:-~/.cache}/spiffe-oauth-sidecar``. The
Makefile computes the same path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def cache_dir() -> Path:
    explicit = os.environ.get("SIDECAR_INTEROP_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spiffe-oauth-sidecar"


def missing(reason: str) -> None:
    """Skip a peer that is not installed locally; under CI a missing peer is a failure."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
