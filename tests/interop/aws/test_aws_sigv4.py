"""``kind: aws_sts`` + ``credential: aws_sigv4`` against moto (STS and S3) on loopback.

moto runs in this process behind real TLS (the dev CA's certificate), and checks what arrives
the way AWS does: after the one unauthenticated AssumeRoleWithWebIdentity call
(``INITIAL_NO_AUTH_ACTION_COUNT = 1``), every S3 request must carry a SigV4 signature that
moto recomputes with botocore's signer from the request it received, an access key and session
token it issued, and an IAM role policy that allows the action. botocore's signer is also run
directly on the same requests as the sidecar's kind (an independent oracle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials as BotoCredentials
from moto import settings
from moto.core.responses import ActionAuthenticatorMixin
from moto.iam.models import iam_backends
from moto.moto_api._internal.models import moto_api_backend
from moto.server import DomainDispatcherApplication, create_backend_app
from moto.sts.models import sts_backends
from werkzeug.serving import make_server

from sidecar import config
from sidecar.credentials.aws_sts import AwsSession, session_name
from sidecar.credentials.kinds.aws_sigv4 import AwsSigV4, amz_date
from sidecar.credentials.token_client import TokenKey
from sidecar.devstack.stack import DevStack
from sidecar.ops.checks import explain
from sidecar.runtime import Sidecar
from sidecar.secret import Secret
from tests.conftest import AppClient, LogCapture, assert_no_secrets

ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/sidecar-app"
S3_HOST = "s3.us-east-1.amazonaws.com"
SPIFFE_ID = "spiffe://example.org/ns/default/sa/app"


@pytest.fixture
def moto(stack: DevStack) -> Iterator[str]:
    """moto's STS and S3 on https://127.0.0.1:<port>, checking signatures after one call."""
    tls = stack.ca.issue_server("127.0.0.1", "localhost")
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=tls.server_context())
    thread = threading.Thread(target=server.serve_forever, name="moto", daemon=True)
    # moto logs the requests it checks, session tokens included, at DEBUG: its logs are not
    # ours, and the suite scans every captured line for the credentials issued.
    moto_log = logging.getLogger("moto")
    moto_level = moto_log.level
    moto_log.setLevel(logging.INFO)
    before = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 1  # AssumeRoleWithWebIdentity is not signed
    ActionAuthenticatorMixin.request_count = 0
    iam = iam_backends[ACCOUNT]["aws"]
    trust = {"Version": "2012-10-17", "Statement": []}
    iam.create_role("sidecar-app", json.dumps(trust), "/", None, "", [], None)
    allow = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_role_policy("sidecar-app", "s3", json.dumps(allow))
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
        settings.INITIAL_NO_AUTH_ACTION_COUNT = before
        moto_log.setLevel(moto_level)
        moto_api_backend.reset()


def aws_secrets() -> list[str]:
    """Every credential moto's STS issued (none may reach a log)."""
    roles = sts_backends[ACCOUNT]["aws"].assumed_roles
    return [s for r in roles for s in (r.secret_access_key, r.session_token)]


def aws_config(stack: DevStack, moto: str, **destination: Any) -> config.Config:
    doc = stack.sidecar_config()
    doc["authorization_servers"] = {
        "aws": {
            "kind": "aws_sts",
            "token_endpoint": f"{moto}/",
            "ca_file": str(stack.ca_file),
            "role_arn": ROLE,
        }
    }
    doc["destinations"] = [
        {
            "name": "s3",
            "host": S3_HOST,
            "upstream": moto,
            "credential": "aws_sigv4",
            "authorization_server": "aws",
            "ca_file": str(stack.ca_file),
            "allow_private": True,  # moto is on loopback
            **destination,
        }
    ]
    return config.parse(doc)


async def chunks(size: int) -> AsyncIterator[bytes]:
    piece = bytes(range(256)) * 256  # 64 KiB
    sent = 0
    while sent < size:
        chunk = piece[: min(len(piece), size - sent)]
        sent += len(chunk)
        yield chunk


def listing(body: bytes) -> dict[str | None, str | None]:
    """Key -> Size of an S3 ListObjectsV2 answer (from moto, in this process)."""
    root = ET.fromstring(body)  # noqa: S314 - our own test peer
    found = {}
    for contents in root.iter():
        if contents.tag.endswith("}Contents"):
            fields = {child.tag.rpartition("}")[2]: child.text for child in contents}
            found[fields.get("Key")] = fields.get("Size")
    return found


def _big_digest(size: int, algorithm: Any = hashlib.sha256) -> str:
    digest = algorithm()
    piece = bytes(range(256)) * 256
    sent = 0
    while sent < size:
        chunk = piece[: min(len(piece), size - sent)]
        digest.update(chunk)
        sent += len(chunk)
    return digest.hexdigest()


async def test_s3_through_the_sidecar_with_sts_session_credentials(
    stack: DevStack, moto: str, logs: LogCapture
) -> None:
    cfg = aws_config(stack, moto)
    base = f"http://{S3_HOST}"
    big = 20 * 1024 * 1024
    async with Sidecar(cfg, grace=1.0) as sidecar, AppClient(sidecar) as app:
        # The app's SDK signs with placeholder keys: its signature headers are replaced.
        placeholder = {
            "Authorization": "AWS4-HMAC-SHA256 Credential=PLACEHOLDER/20260101/us-east-1/s3/"
            "aws4_request, SignedHeaders=host, Signature=00",
            "X-Amz-Date": "20000101T000000Z",
            "X-Amz-Security-Token": "placeholder",
        }
        status, _, body = await app.request("PUT", f"{base}/invoices", headers=placeholder)
        assert status == 200, body
        status, _, body = await app.request(
            "PUT",
            f"{base}/invoices/2026/a b+c.json",
            data=b'{"amount": 42}',
            headers={"Content-Type": "application/json", "x-amz-meta-owner": "billing"},
        )
        assert status == 200, body
        # 20 MB, larger than the replay buffer: streamed, signed with UNSIGNED-PAYLOAD.
        status, _, body = await app.request(
            "PUT",
            f"{base}/invoices/big.bin",
            data=chunks(big),
            headers={"Content-Length": str(big)},
        )
        assert status == 200, body
        status, headers, body = await app.request("GET", f"{base}/invoices/2026/a%20b%2Bc.json")
        assert status == 200, body
        assert body == b'{"amount": 42}'
        assert headers["x-amz-meta-owner"] == "billing"
        status, _, body = await app.request(
            # (moto checks the query as werkzeug decoded it: "%2F" would be "/" there, so the
            # prefix has no reserved character; the botocore cases below cover encoding.)
            "GET",
            f"{base}/invoices?list-type=2&prefix=2026&max-keys=10",
        )
        assert status == 200, body
        assert listing(body) == {"2026/a b+c.json": "14"}
        status, _, body = await app.request("GET", f"{base}/invoices?list-type=2")
        assert listing(body) == {"2026/a b+c.json": "14", "big.bin": str(big)}
        # The streamed object arrived whole: S3's ETag of a single PUT is the body's MD5.
        status, headers, _ = await app.request("HEAD", f"{base}/invoices/big.bin")
        assert status == 200
        assert headers["ETag"].strip('"') == _big_digest(big, hashlib.md5)
        assert headers["Content-Length"] == str(big)
        status, _, body = await app.request(
            "GET", f"{base}/invoices/big.bin", headers={"Range": "bytes=-65536"}
        )
        assert status == 206
        assert body == bytes(range(256)) * 256
        metrics = sidecar.metrics.exposition().decode()
        ready, problems = sidecar.readiness()
        spiffe_id = sidecar.identity.spiffe_id
        assert spiffe_id is not None
    # One AssumeRoleWithWebIdentity for all of it (cached like a token).
    roles = sts_backends[ACCOUNT]["aws"].assumed_roles
    assert len(roles) == 1
    assert roles[0].role_arn == ROLE
    expected = session_name(spiffe_id)
    assert roles[0].session_name == expected
    assert 'sidecar_token_requests_total{authorization_server="aws",outcome="ok"} 1.0' in metrics
    assert ready, problems
    audit = [json.loads(line) for line in logs.lines if "aws_session_issued" in line]
    assert [(a["role_arn"], a["session_name"]) for a in audit] == [(ROLE, expected)]
    requests = [r for r in map(json.loads, logs.lines) if r.get("event") == "request"]
    assert len(requests) == 8
    assert {
        (r["token_kind"], r["token_role"], r["token_service"], r["token_region"]) for r in requests
    } == {
        (
            "aws_sigv4",
            f"arn:aws:sts::{ACCOUNT}:assumed-role/sidecar-app/{expected}",
            "s3",
            "us-east-1",
        )
    }
    assert_no_secrets(logs.text(), aws_secrets())
    assert_no_secrets(metrics, aws_secrets())


def test_explain_shows_the_role_and_session_never_keys(stack: DevStack, moto: str) -> None:
    cfg = aws_config(stack, moto)
    text, _ = explain(cfg, "GET", f"http://{S3_HOST}/bucket/key")
    assert "aws_sigv4 (service s3, region us-east-1)" in text
    assert f"role {ROLE}" in text
    assert "session name   derived from the SPIFFE ID" in text


# -- botocore's signer on the same requests (independent oracle) ------------------------------

SESSION = AwsSession(
    value=Secret("FwoGZXIvYXdzEXAMPLEsessiontoken/+="),
    token_type="Bearer",
    issued_at=0.0,
    expires_at=3600.0,
    scope=(),
    claims={"sub": f"arn:aws:sts::{ACCOUNT}:assumed-role/sidecar-app/x"},
    access_key_id="ASIAEXAMPLEEXAMPLE00",
    secret_key=Secret("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
)
KEY = TokenKey("aws", SPIFFE_ID, "token_exchange", None, None, (), None)
WALL = 1_796_193_000.0  # a fixed instant


class _NoTokens:
    def cached(self, route: Any, scopes: Any, jkt: Any) -> None:
        return None

    async def lookup(self, route: Any, scopes: Any, jkt: Any) -> Any:
        raise AssertionError("not used")

    def evict(self, key: Any, token: Any) -> None:
        return None


CASES = [
    # service, method, origin, path, query, app headers, body
    ("s3", "GET", "https://s3.us-east-1.amazonaws.com", "/bucket/key", "", [], b""),
    (
        "s3",
        "GET",
        "https://s3.us-east-1.amazonaws.com",
        "/bucket",
        "list-type=2&prefix=a%2Fb%20c&max-keys=5&delimiter=%2F",
        [],
        b"",
    ),
    (
        "s3",
        "PUT",
        "https://bucket.s3.eu-west-1.amazonaws.com",
        "/dir/a%20b%2Bc%21.json",
        "",
        [("Content-Type", "application/json"), ("x-amz-meta-owner", "  billing   team ")],
        b'{"amount": 42}',
    ),
    ("s3", "PUT", "https://127.0.0.1:9000", "/bucket/big", "", [], None),  # streamed
    (
        "sqs",
        "POST",
        "https://sqs.us-east-1.amazonaws.com",
        "/123456789012/queue",
        "",
        [("Content-Type", "application/x-www-form-urlencoded")],
        b"Action=SendMessage&MessageBody=hi",
    ),
    (
        "execute-api",
        "GET",
        "https://abc.execute-api.us-east-1.amazonaws.com",
        "/prod/a%20b/./c//d/../e",
        "b=2&a=1&a=0&empty=",
        [("X-Amz-Target", "x")],
        b"",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_botocore_signs_the_same_requests_the_same_way(case: tuple[Any, ...]) -> None:
    service, method, origin, path, query, headers, body = case
    region = "eu-west-1" if "eu-west-1" in origin else "us-east-1"
    kind = AwsSigV4(_NoTokens(), service, region, wall=lambda: WALL)
    digest = None if body is None else hashlib.sha256(body).hexdigest()
    lines = kind.header_lines((KEY, SESSION), method, origin, path, query, headers, digest)
    ours = dict(line.split(": ", 1) for line in lines.strip().split("\r\n"))
    # botocore, given the request as sent (URL, the headers we sign) and the same instant.
    url = f"{origin}{path}" + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, data=body or b"", headers=dict(headers))
    request.headers["X-Amz-Date"] = amz_date(WALL)
    request.headers["X-Amz-Security-Token"] = SESSION.value.reveal()
    request.headers["X-Amz-Content-SHA256"] = digest or "UNSIGNED-PAYLOAD"
    request.context["timestamp"] = amz_date(WALL)
    credentials = BotoCredentials(
        SESSION.access_key_id, SESSION.secret_key.reveal(), SESSION.value.reveal()
    )
    signer = (S3SigV4Auth if service == "s3" else SigV4Auth)(credentials, service, region)
    canonical = signer.canonical_request(request)
    signature = signer.signature(signer.string_to_sign(request, canonical), request)
    assert ours["Authorization"].endswith(f"Signature={signature}"), canonical
    assert (
        f"SignedHeaders={signer.signed_headers(signer.headers_to_sign(request))},"
        in (ours["Authorization"])
    )
    assert ours["X-Amz-Date"] == amz_date(WALL)
    assert ours["X-Amz-Security-Token"] == SESSION.value.reveal()
    assert ours["X-Amz-Content-SHA256"] == (digest or "UNSIGNED-PAYLOAD")
