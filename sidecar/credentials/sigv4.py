"""AWS Signature Version 4 (pure): canonical request, string to sign, signature.

The steps of AWS's "Create a signed AWS API request" (IAM User Guide, reference_sigv_create-
signed-request), checked against AWS's published test suite (tests/interop/aws/sigv4_suite)
and against botocore's signer on the same requests:

1. canonical request: method, canonical URI, canonical query, canonical headers, signed header
   names, hashed payload, joined by LF;
2. string to sign: ``AWS4-HMAC-SHA256``, the timestamp, the scope
   ``<date>/<region>/<service>/aws4_request``, the canonical request's SHA-256;
3. the signing key: HMAC-SHA256 chained over date, region, service, ``aws4_request`` from
   ``"AWS4" + secret key``; the signature is HMAC(signing key, string to sign) in hex.

The canonical URI is the path as sent, for S3 as it is (S3 neither normalises nor encodes it
again), for every other service with dot segments and repeated slashes removed and then
URI-encoded (so an already percent-encoded path is encoded twice, as AWS specifies). The query
is decoded and re-encoded pair by pair (RFC 3986 unreserved characters kept), then sorted.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Signed:
    """What a signature adds to a request (the lines are built by the caller)."""

    authorization: str
    signed_headers: str
    canonical_request: str
    string_to_sign: str


def canonical_uri(path: str, *, normalize: bool, encode: bool) -> str:
    if normalize:
        path = _remove_dot_segments(path)
    if encode:
        path = quote(path, safe="/~")
    return path or "/"


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, and empty segments dropped (AWS: "//a//" is "/a/")."""
    out: list[str] = []
    segments = path.split("/")
    for segment in segments:
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    trailing = len(segments) > 1 and segments[-1] in ("", ".", "..")
    text = "/" + "/".join(out)
    return text + "/" if trailing and out else text


def canonical_query(query: str) -> str:
    """Each name and value decoded, URI-encoded (unreserved kept, space as %20), sorted."""
    if not query:
        return ""
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((_encode(unquote(name)), _encode(unquote(value))))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def _encode(text: str) -> str:
    return quote(text, safe="-_.~")


def canonical_headers(headers: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """(canonical header block, signed header names): lower-case names, sorted; values trimmed
    with inner runs of spaces collapsed; repeated names' values joined by commas in order."""
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.strip().lower(), []).append(" ".join(value.split()))
    names = sorted(merged)
    block = "".join(f"{name}:{','.join(merged[name])}\n" for name in names)
    return block, ";".join(names)


def scope(date: str, region: str, service: str) -> str:
    return f"{date[:8]}/{region}/{service}/aws4_request"


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    key = _hmac(f"AWS4{secret_key}".encode(), date[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    return key


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign(
    *,
    access_key_id: str,
    secret_key: str,
    region: str,
    service: str,
    amz_date: str,
    method: str,
    path: str,
    query: str,
    headers: Sequence[tuple[str, str]],
    payload_hash: str,
    normalize: bool = True,
    encode: bool = True,
) -> Signed:
    """Sign a request whose ``headers`` (``host`` and ``x-amz-date`` among them) are exactly
    the ones to sign. ``amz_date``: ``YYYYMMDDTHHMMSSZ`` (UTC)."""
    block, signed = canonical_headers(headers)
    canonical = "\n".join(
        [
            method.upper(),
            canonical_uri(path, normalize=normalize, encode=encode),
            canonical_query(query),
            block,
            signed,
            payload_hash,
        ]
    )
    where = scope(amz_date, region, service)
    to_sign = "\n".join(
        [ALGORITHM, amz_date, where, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    key = signing_key(secret_key, amz_date, region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    authorization = (
        f"{ALGORITHM} Credential={access_key_id}/{where}, SignedHeaders={signed}, "
        f"Signature={signature}"
    )
    return Signed(authorization, signed, canonical, to_sign)
