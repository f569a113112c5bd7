"""The token response parser: what the AS answers becomes a token or the app's error."""

from __future__ import annotations

import json

import jwt
import pytest

from sidecar.credentials.token_client import DEFAULT_LIFETIME, parse_token_response
from sidecar.errors import ProxyError, Scrubber, TokenRejected, TokenUnavailable


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


def doc_answer(**fields: object) -> bytes:
    return json.dumps({"access_token": "opaque", "token_type": "DPoP", **fields}).encode()


def jwt_with(claims: dict[str, object]) -> str:
    return jwt.encode(claims, "k" * 32, algorithm="HS256")


@pytest.mark.parametrize(
    "body",
    [
        doc_answer(expires_in=-1),
        doc_answer(expires_in=0),
        doc_answer(expires_in=0.0),
        doc_answer(expires_in="300"),  # RFC 6749 §5.1: numbers are JSON numbers
        doc_answer(expires_in="soon"),
        doc_answer(expires_in=None),
        doc_answer(expires_in=True),
        doc_answer(expires_in=[300]),
        doc_answer(expires_in={"s": 300}),
        doc_answer(expires_in=366 * 86400),  # beyond a year
        doc_answer(expires_in=10**400),
        b'{"access_token": "opaque", "token_type": "DPoP", "expires_in": NaN}',
        b'{"access_token": "opaque", "token_type": "DPoP", "expires_in": Infinity}',
        b'{"access_token": "opaque", "token_type": "DPoP", "expires_in": -Infinity}',
        b'{"access_token": "opaque", "token_type": "DPoP", "expires_in": 1e400}',
    ],
)
def test_a_bad_expires_in_is_refused_not_defaulted(body: bytes) -> None:
    with pytest.raises(TokenRejected) as refused:
        parse_token_response(200, body, dpop=True, route="saas", now=0.0, wall=1e9)
    assert refused.value.code == "token_request_rejected"
    assert "expires_in" in refused.value.detail


@pytest.mark.parametrize("exp", [1e9 - 1, 1e9, "tomorrow", True, None])
def test_an_exp_already_past_or_unreadable_is_refused(exp: object) -> None:
    body = json.dumps(
        {"access_token": jwt_with({"exp": exp}), "token_type": "DPoP", "expires_in": 60}
    ).encode()
    with pytest.raises(TokenRejected):
        parse_token_response(200, body, dpop=True, route="saas", now=0.0, wall=1e9)


def test_life_counts_from_the_request_sent_time_and_ends_at_the_earlier_of_exp() -> None:
    # Sent at 100, answered at 105 (a slow AS): expires_in 60 counts from 100.
    token = parse_token_response(
        200, doc_answer(expires_in=60), dpop=True, route="r", now=105.0, sent_at=100.0, wall=1e9
    )
    assert (token.issued_at, token.expires_at) == (100.0, 160.0)
    # exp is 30 s after the answer (wall clock): it ends at 105 + 30 = 135, before 160.
    value = jwt_with({"exp": 1e9 + 30})
    body = json.dumps({"access_token": value, "token_type": "DPoP", "expires_in": 60}).encode()
    token = parse_token_response(
        200, body, dpop=True, route="r", now=105.0, sent_at=100.0, wall=1e9
    )
    assert token.expires_at == pytest.approx(135.0)
    # exp alone (no expires_in): the same instant.
    body = json.dumps({"access_token": value, "token_type": "DPoP"}).encode()
    token = parse_token_response(
        200, body, dpop=True, route="r", now=105.0, sent_at=100.0, wall=1e9
    )
    assert token.expires_at == pytest.approx(135.0)


def test_neither_expires_in_nor_exp_gets_the_documented_default() -> None:
    token = parse_token_response(200, doc_answer(), dpop=True, route="r", now=10.0, wall=1e9)
    assert token.lifetime == DEFAULT_LIFETIME == 300.0


@pytest.mark.parametrize(
    ("status", "doc", "code", "kind"),
    [
        (
            401,
            {"error": "invalid_client", "error_description": "bad secret hunter2"},
            "invalid_client",
            TokenRejected,
        ),
        (400, {"error": "hunter2-in-the-code"}, "unknown", TokenRejected),
        (400, {"error": ["invalid_client"]}, "unknown", TokenRejected),
        (
            503,
            {"error": "temporarily_unavailable", "error_description": "hunter2"},
            "temporarily_unavailable",
            TokenUnavailable,
        ),
        (429, {}, "unknown", TokenUnavailable),
        (500, None, "unknown", TokenUnavailable),
    ],
)
def test_an_error_answer_keeps_only_a_registered_code(
    status: int, doc: object, code: str, kind: type[Exception]
) -> None:
    body = json.dumps(doc).encode() if doc is not None else b"<html>hunter2</html>"
    with pytest.raises(kind) as refused:
        parse_token_response(
            status, body, dpop=True, route="r", now=0.0, scrub=Scrubber(["hunter2"])
        )
    error = refused.value
    assert isinstance(error, ProxyError)
    assert error.upstream_error == code
    shown = json.dumps(error.body()) + str(error.headers()) + error.detail + str(error)
    assert "hunter2" not in shown
    assert "hunter2" not in (error.peer_text or "")


def test_a_deeply_nested_answer_is_refused_cleanly() -> None:
    with pytest.raises(TokenUnavailable):
        parse_token_response(500, b"[" * 100_000, dpop=True, route="r", now=0.0)


def test_an_unsupported_token_type_is_not_echoed() -> None:
    body = json.dumps({"access_token": "x", "token_type": "hunter2-type"}).encode()
    with pytest.raises(TokenRejected) as refused:
        parse_token_response(200, body, dpop=True, route="r", now=0.0)
    assert "hunter2" not in refused.value.detail


def test_claims_that_echo_what_was_sent_are_scrubbed_before_audit() -> None:
    value = jwt_with(
        {"sub": "spiffe://td/app", "jti": "x-hunter2secret-x", "aud": ["hunter2secret"]}
    )
    body = json.dumps({"access_token": value, "token_type": "DPoP", "expires_in": 60}).encode()
    token = parse_token_response(
        200, body, dpop=True, route="r", now=0.0, wall=1e9, scrub=Scrubber(["hunter2secret"])
    )
    assert token.claims["sub"] == "spiffe://td/app"
    assert "hunter2" not in json.dumps(token.claims)
    assert "hunter2" not in json.dumps(token.reference)
