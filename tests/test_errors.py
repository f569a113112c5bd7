"""By-value scrubbing of what peers say back, the registered OAuth error codes, and the
sidecar's own error codes as the README lists them."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from sidecar.errors import OAUTH_ERRORS, Scrubber, error_codes, registered_error

README = Path(__file__).resolve().parents[1] / "README.md"

JWT = (
    "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZyJ9.c2lnbmF0dXJlLXNlZ21lbnQtMTIzNDU2"
)
SECRET = "hunter2-is/not+a=secret&really"


@pytest.mark.parametrize(
    "echo",
    [
        JWT,
        JWT.split(".")[2],  # the signature segment alone (sanitize()'s pattern missed it)
        JWT.split(".")[1],
        JWT[5:40],  # any run of 8+ characters
        SECRET,
        quote(SECRET, safe=""),
        quote_plus(SECRET),
        base64.b64encode(SECRET.encode()).decode(),
        base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("="),
        json.dumps(SECRET)[1:-1],
        SECRET[3:14],
    ],
)
def test_what_was_sent_is_removed_by_value(echo: str) -> None:
    scrubber = Scrubber([JWT, SECRET])
    out = scrubber.scrub(f"invalid client: got {echo}; check it")
    assert echo not in out
    assert "[redacted]" in out
    assert out.startswith("invalid client: got ")
    assert out.endswith("; check it")


def test_text_without_sent_values_is_kept_printable_and_bounded() -> None:
    scrubber = Scrubber(["a-value-we-sent"])
    assert scrubber.scrub("client authentication failed") == "client authentication failed"
    assert scrubber.scrub("line\r\nX-Injected: 1") == "line??X-Injected: 1"
    assert len(scrubber.scrub("x" * 10_000)) == 200
    assert "value-we" not in repr(scrubber)


def test_a_short_secret_is_removed_whole() -> None:
    assert "abc" not in Scrubber(["abc"]).scrub("the secret abc was wrong")


@pytest.mark.parametrize("code", sorted(OAUTH_ERRORS))
def test_registered_codes_are_kept(code: str) -> None:
    assert registered_error(code) == code


@pytest.mark.parametrize(
    "code", ["", "hunter2", "invalid_client " + JWT, "INVALID_CLIENT", None, 7, ["invalid_client"]]
)
def test_anything_else_is_unknown(code: object) -> None:
    assert registered_error(code) == "unknown"


def test_the_readme_error_table_lists_every_code_the_sidecar_answers() -> None:
    table = README.read_text().partition("| status | error | when |")[2].partition("\n\n")[0]
    cells = "\n".join(row.split("|")[2] for row in table.strip().split("\n")[1:])
    listed = set(re.findall(r"`([a-z_]+)`", cells))
    assert listed == error_codes()
    assert {"app_gone", "internal_error", "destination_not_allowed", "upstream_busy"} <= listed
