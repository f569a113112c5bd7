"""TLS client contexts per config: carried over a reload, and never built on the event loop
for a route or server of an older config still in flight (sidecar/tls.py)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from sidecar.devstack.pki import DevCA
from sidecar.tls import ContextCache


def built(previous: ContextCache | None, *ca_files: Path) -> ContextCache:
    """What build_snapshot does: every configured CA file's context, then sealed."""
    cache = ContextCache(previous)
    for ca_file in ca_files:
        cache.get(ca_file)
    return cache.seal()


@pytest.fixture
def ca_files(tmp_path: Path) -> tuple[Path, Path]:
    return DevCA("a").write_ca(tmp_path / "a.pem"), DevCA("b").write_ca(tmp_path / "b.pem")


def test_an_unchanged_ca_file_keeps_its_context_and_a_changed_one_gets_a_new_one(
    ca_files: tuple[Path, Path], tmp_path: Path
) -> None:
    a, b = ca_files
    first = built(None, a, b)
    b.write_bytes(DevCA("b, rotated").write_ca(tmp_path / "b2.pem").read_bytes())
    second = built(first, a, b)
    assert second.get(a) is first.get(a)
    assert second.get(b) is not first.get(b)


def test_an_old_routes_ca_after_a_reload_is_served_without_reading_the_file(
    ca_files: tuple[Path, Path],
) -> None:
    a, b = ca_files
    first = built(None, a, b)
    old = first.get(b)
    second = built(first, a)  # the reload dropped the route on b.pem
    b.unlink()  # reading it now would raise: the old route's context must come from memory
    assert second.get(b) is old
    del first
    third = built(second, a)  # a second reload while the old route's request still runs
    assert third.get(b) is old  # still alive (the request holds it): found, not rebuilt


def test_a_context_nothing_holds_any_more_is_built_again(ca_files: tuple[Path, Path]) -> None:
    a, b = ca_files
    first = built(None, a, b)
    second = built(first, a)
    third = built(second, a)
    del first, second
    gc.collect()
    context = third.get(b)  # nothing kept the old one: built (the file is still there)
    assert context.verify_mode.name == "CERT_REQUIRED"
    assert third.get(b) is context
