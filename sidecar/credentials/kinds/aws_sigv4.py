"""AWS SigV4 as a kind of credential: ``credential: aws_sigv4`` (issue #20.1).

Session credentials come from the route's ``kind: aws_sts`` server through the broker's
:class:`~sidecar.credentials.kinds.oauth.TokenSource` (cached, refreshed ahead, single flight,
backoff, never expired: the token cache holds them as an
:class:`~sidecar.credentials.aws_sts.AwsSession`). Each request is signed
(:mod:`sidecar.credentials.sigv4`) over what is actually sent: the method, the upstream's host,
the raw path and query, the app's ``Content-Type``, ``Content-MD5`` and ``X-Amz-*`` headers
(S3 requires every ``x-amz-*`` header to be signed), ``X-Amz-Date``, ``X-Amz-Security-Token``
and ``X-Amz-Content-SHA256``: the body's SHA-256 when it was buffered, ``UNSIGNED-PAYLOAD``
when it streams (S3 accepts it; most other services do not: see config/README.md).

The app's own ``Authorization`` and signature headers are stripped (its SDK signs with
placeholder keys); its other ``X-Amz-*`` headers (``x-amz-meta-*``, ``x-amz-acl``...) are
forwarded and signed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sidecar.credentials import sigv4
from sidecar.credentials.aws_sts import AwsSession
from sidecar.credentials.kind import Answer
from sidecar.credentials.kinds.oauth import Held, TokenSource
from sidecar.routing import Route

SIGNATURE_HEADERS = frozenset(
    {"authorization", "dpop", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
)
_SIGNED_APP_HEADERS = frozenset({"content-type", "content-md5"})


def amz_date(wall: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(wall))


def signed_app_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The app's headers that go into the signature (the others are sent unsigned)."""
    return [
        (name, value)
        for name, value in headers
        if name.lower() in _SIGNED_APP_HEADERS or name.lower().startswith("x-amz-")
    ]


class AwsSigV4:
    """``credential: aws_sigv4`` for one route (its service and region)."""

    strips = SIGNATURE_HEADERS
    wants_body_digest = True
    jkt: str | None = None

    def __init__(
        self,
        tokens: TokenSource,
        service: str,
        region: str,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._tokens = tokens
        self.service = service
        self.region = region
        self._wall = wall
        self._s3 = (
            service == "s3"
        )  # S3: the path is signed as sent (no normalising, no re-encoding)

    def ready(self, route: Route, scopes: tuple[str, ...]) -> Held | None:
        return self._tokens.cached(route, scopes, None)

    async def prepare(self, route: Route, scopes: tuple[str, ...]) -> tuple[Held, bool]:
        key, session, hit = await self._tokens.lookup(route, scopes, None)
        return (key, session), hit

    def reference(self, held: Held) -> Mapping[str, Any]:
        return {
            "kind": "aws_sigv4",
            "role": held[1].claims.get("sub"),
            "service": self.service,
            "region": self.region,
        }

    def header_lines(
        self,
        held: Held,
        method: str,
        origin: str,
        path: str,
        query: str,
        headers: Sequence[tuple[str, str]],
        body_digest: str | None,
    ) -> str:
        session = held[1]
        assert isinstance(session, AwsSession)  # an aws_sts server issued it
        date = amz_date(self._wall())
        payload = body_digest or sigv4.UNSIGNED_PAYLOAD
        token = session.value.reveal()
        host = origin.partition("://")[2]
        signed = sigv4.sign(
            access_key_id=session.access_key_id,
            secret_key=session.secret_key.reveal(),
            region=self.region,
            service=self.service,
            amz_date=date,
            method=method,
            path=path,
            query=query,
            headers=[
                ("host", host),
                ("x-amz-date", date),
                ("x-amz-security-token", token),
                ("x-amz-content-sha256", payload),
                *signed_app_headers(headers),
            ],
            payload_hash=payload,
            normalize=not self._s3,
            encode=not self._s3,
        )
        return (
            f"Authorization: {signed.authorization}\r\nX-Amz-Date: {date}\r\n"
            f"X-Amz-Security-Token: {token}\r\nX-Amz-Content-SHA256: {payload}\r\n"
        )

    def learn(self, origin: str, answer: Answer) -> None:
        return None

    def retry_reason(self, answer: Answer) -> str | None:
        return None  # AWS answers 403 to a bad signature: nothing a second attempt fixes

    async def again(self, held: Held, route: Route, scopes: tuple[str, ...], reason: str) -> Held:
        return held
