"""AWS's published SigV4 test suite (data in sigv4_suite/, see its NOTICE.md) through
:mod:`sidecar.credentials.sigv4`: canonical request, string to sign and signature, per case."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sidecar.credentials import sigv4

SUITE = Path(__file__).parent / "sigv4_suite"
CASES = sorted(p.name for p in SUITE.iterdir() if p.is_dir())


def parse_request(raw: str) -> tuple[str, str, str, list[tuple[str, str]], bytes]:
    """request.txt: ``METHOD target HTTP/1.1`` (the target may hold spaces), ``Name:value``
    lines (a line starting with whitespace continues the previous value: obs-fold), then,
    after a blank line, the body."""
    head, _, body = raw.partition("\n\n")
    first, *lines = head.rstrip("\n").split("\n")
    method, _, rest = first.partition(" ")
    target = rest.rpartition(" ")[0]
    path, _, query = target.partition("?")
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, f"{value} {line.strip()}")
            continue
        name, _, value = line.partition(":")
        headers.append((name, value))
    return method, path, query, headers, body.encode()


def test_the_whole_suite_is_here() -> None:
    assert len(CASES) == 38


@pytest.mark.parametrize("case", CASES)
def test_aws_sigv4_suite(case: str) -> None:
    folder = SUITE / case
    context = json.loads((folder / "context.json").read_text())
    method, path, query, headers, body = parse_request((folder / "request.txt").read_text())
    amz_date = context["timestamp"].replace("-", "").replace(":", "")
    creds = context["credentials"]
    headers.append(("X-Amz-Date", amz_date))
    token = creds.get("token")
    if token and not context.get("omit_session_token", False):
        headers.append(("X-Amz-Security-Token", token))
    payload = hashlib.sha256(body).hexdigest()
    if context["sign_body"]:
        headers.append(("X-Amz-Content-Sha256", payload))
    signed = sigv4.sign(
        access_key_id=creds["access_key_id"],
        secret_key=creds["secret_access_key"],
        region=context["region"],
        service=context["service"],
        amz_date=amz_date,
        method=method,
        path=path,
        query=query,
        headers=headers,
        payload_hash=payload,
        normalize=context["normalize"],
    )
    assert signed.canonical_request == (folder / "header-canonical-request.txt").read_text()
    assert signed.string_to_sign == (folder / "header-string-to-sign.txt").read_text()
    expected = (folder / "header-signature.txt").read_text().strip()
    assert signed.authorization.endswith(f"Signature={expected}")
