"""The token response parser: what the AS answers becomes a token or the app's error."""

from __future__ import annotations

import json

import pytest

from sidecar.credentials.token_client import parse_token_response
from sidecar.errors import TokenRejected


def answer(token: str) -> bytes:
    return json.dumps({"access_token": token, "token_type": "DPoP", "expires_in": 300}).encode()


@pytest.mark.parametrize(
    "token",
    [
        "tok\r\nX-Injected: 1",  # would end the Authorization header and add one
        "tok\nX-Injected: 1",
        "two words",
        "caf\u00e9",
        "",
        "tab\there",
    ],
)
def test_a_token_that_cannot_travel_in_a_header_is_refused(token: str) -> None:
    with pytest.raises(TokenRejected) as refused:
        parse_token_response(200, answer(token), dpop=True, route="saas", now=0.0)
    detail = refused.value.detail
    assert "header" in detail
    assert "Injected" not in detail
    assert "words" not in detail


def test_visible_ascii_tokens_are_accepted() -> None:
    token = "eyJhbGciOi.J-_~+/=.sig!#$%&'*^`|"
    parsed = parse_token_response(200, answer(token), dpop=True, route="saas", now=10.0)
    assert parsed.value.reveal() == token
    assert (parsed.token_type, parsed.expires_at) == ("DPoP", 310.0)
