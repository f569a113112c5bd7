"""DPoP proofs, checked with an independent JOSE implementation (joserfc)."""

import base64
import hashlib
import json

import pytest
from joserfc import jws
from joserfc.jwk import ECKey

from sidecar.credentials.dpop import DpopKey, NonceStore, access_token_hash, htu


def decode(proof: str) -> tuple[dict[str, object], dict[str, object]]:
    header_b64, claims_b64, _ = proof.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(header_b64))),
        json.loads(base64.urlsafe_b64decode(pad(claims_b64))),
    )


def test_proof_verifies_with_an_independent_library() -> None:
    key = DpopKey(clock=lambda: 1_700_000_000)
    proof = key.proof("POST", "https://rs.example/v1/x", access_token="tok", nonce="n-1")
    header, claims = decode(proof)
    assert header == {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.public_jwk}
    assert "d" not in header["jwk"]  # type: ignore[operator]
    public = ECKey.import_key(key.public_jwk)
    jws.deserialize_compact(proof, public, algorithms=["ES256"])  # raises if the signature is bad
    assert claims["htm"] == "POST"
    assert claims["htu"] == "https://rs.example/v1/x"
    assert claims["iat"] == 1_700_000_000
    assert claims["nonce"] == "n-1"
    assert (
        claims["ath"]
        == base64.urlsafe_b64encode(hashlib.sha256(b"tok").digest()).rstrip(b"=").decode()
    )
    assert public.thumbprint() == key.thumbprint


def test_claims_are_valid_json_whatever_the_strings_hold() -> None:
    key = DpopKey(clock=lambda: 1_700_000_000)
    nonce = 'quote" back\\slash \u00e9 \n ctl'
    url = "https://rs.example/p%22ath/\u00fcber"
    proof = key.proof("GET", url, nonce=nonce, ath="precomputed-ath")
    jws.deserialize_compact(proof, ECKey.import_key(key.public_jwk), algorithms=["ES256"])
    _, claims = decode(proof)
    assert (claims["nonce"], claims["htu"], claims["ath"]) == (nonce, url, "precomputed-ath")
    assert "ath" not in decode(key.proof("GET", url))[1]


def test_every_proof_has_a_fresh_jti() -> None:
    key = DpopKey()
    jtis = {decode(key.proof("GET", "https://a/"))[1]["jti"] for _ in range(200)}
    assert len(jtis) == 200


def test_repr_shows_no_key_material() -> None:
    key = DpopKey()
    assert repr(key) == f"DpopKey(jkt={key.thumbprint})"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("HTTPS", "API.Example", 443, "/a/b?q=1#f"), "https://api.example/a/b"),
        (("https", "api.example", 8443, ""), "https://api.example:8443/"),
        (("http", "api.example", 80, "/x"), "http://api.example/x"),
        (("https", "::1", 8443, "/p"), "https://[::1]:8443/p"),
        (("https", "api.example", None, "/p%2Fq"), "https://api.example/p%2Fq"),
    ],
)
def test_htu_normalisation(args: tuple[str, str, int | None, str], expected: str) -> None:
    assert htu(*args) == expected


def test_access_token_hash_matches_rfc9449_example() -> None:
    # RFC 9449 §7.1 example token and its ath.
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    assert access_token_hash(token) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


def test_nonce_store_is_per_origin_and_bounded() -> None:
    store = NonceStore(limit=2)
    store.update("https://a", "n1")
    store.update("https://b", "n2")
    store.update("https://a", "n3")
    store.update("https://c", "n4")
    assert store.get("https://a") == "n3"
    assert store.get("https://b") is None  # oldest dropped
    store.update("https://c", "bad\nnonce\u00e9")
    assert store.get("https://c") == "n4"
