"""Google Cloud workload identity federation (issue #20.2): the requests as values, and the
exchange the token client runs for ``kind: google_sts`` servers.

1. RFC 8693 token exchange at Google's STS (``POST https://sts.googleapis.com/v1/token``, no
   client authentication): ``audience`` = the pool provider's resource name, the JWT-SVID as
   ``subject_token`` (``urn:ietf:params:oauth:token-type:jwt``), ``requested_token_type``
   access token, ``scope``: the route's scopes, or, when a service account is impersonated
   next, ``https://www.googleapis.com/auth/iam``: all the federated token needs to call IAM
   Credentials, and what Google's own client (google-auth) sends, as tests/interop/google
   checks (Google's curl examples use ``cloud-platform``, which is broader);
2. with ``service_account``: IAM Credentials ``generateAccessToken`` for it, authorised with
   the federated token (``{"scope": [...], "lifetime": "<n>s"}``), answering
   ``{"accessToken", "expireTime"}``.

The result is an ordinary Bearer :class:`~sidecar.credentials.token_client.AccessToken`: the
route is ``credential: bearer`` and the token cache keeps it like any other.
"""

from __future__ import annotations

import calendar
import json
import logging
import re
import time
from typing import Any
from urllib.parse import quote, urlencode

from sidecar.config import AuthorizationServer
from sidecar.credentials.token_client import (
    TOKEN_EXCHANGE,
    TOKEN_TYPE_JWT,
    AccessToken,
    TokenClient,
    TokenKey,
    parse_token_response,
)
from sidecar.errors import Scrubber, TokenRejected, TokenUnavailable
from sidecar.secret import Secret

audit = logging.getLogger("sidecar.audit")

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
IAM_SCOPE = "https://www.googleapis.com/auth/iam"  # google-auth's, for impersonation
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?Z")
# google.rpc.Code names (IAM Credentials' error.status): shown to the app, else "unknown".
RPC_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "OUT_OF_RANGE",
        "UNAUTHENTICATED",
        "PERMISSION_DENIED",
        "NOT_FOUND",
        "RESOURCE_EXHAUSTED",
        "UNAVAILABLE",
        "INTERNAL",
        "DEADLINE_EXCEEDED",
    }
)


def sts_form(server: AuthorizationServer, key: TokenKey, subject_token: str) -> dict[str, str]:
    scopes = (IAM_SCOPE,) if server.service_account else key.scopes
    assert server.provider is not None  # validated for kind google_sts
    return {
        "grant_type": TOKEN_EXCHANGE,
        "audience": server.provider,
        "scope": " ".join(scopes),
        "requested_token_type": ACCESS_TOKEN,
        "subject_token": subject_token,
        "subject_token_type": TOKEN_TYPE_JWT,
    }


def generate_access_token(server: AuthorizationServer, key: TokenKey) -> tuple[str, bytes]:
    """(URL, JSON body) of the IAM Credentials call for ``server.service_account``."""
    assert server.service_account is not None
    account = quote(server.service_account, safe="@.")
    url = (
        f"{server.impersonation_endpoint}/v1/projects/-/serviceAccounts/{account}"
        ":generateAccessToken"
    )
    body = {"scope": list(key.scopes), "lifetime": f"{server.duration}s"}
    return url, json.dumps(body).encode()


def parse_generated(
    status: int,
    body: bytes,
    *,
    route: str,
    now: float,
    wall: float,
    scrub: Scrubber | None = None,
) -> AccessToken:
    """IAM Credentials' answer (``accessToken``, ``expireTime``), or the error the app sees:
    the ``error.status`` code when it is a google.rpc code (else ``unknown``); its message only
    as ``peer_text`` for the log, scrubbed of what was sent."""
    try:
        doc: Any = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    if status != 200:
        error = doc.get("error") if isinstance(doc, dict) else None
        error = error if isinstance(error, dict) else {}
        code = error.get("status") if error.get("status") in RPC_CODES else "unknown"
        message = error.get("message")
        peer_text = scrub.scrub(message) if scrub and isinstance(message, str) else None
        if status >= 500 or status == 429:
            raise TokenUnavailable(
                f"IAM Credentials is unavailable (HTTP {status})",
                route=route,
                upstream_error=code,
                peer_text=peer_text,
            )
        raise TokenRejected(
            f"IAM Credentials refused generateAccessToken ({code}, HTTP {status})",
            route=route,
            upstream_error=code,
            peer_text=peer_text,
        )
    token = doc.get("accessToken") if isinstance(doc, dict) else None
    expire = doc.get("expireTime") if isinstance(doc, dict) else None
    if not isinstance(token, str) or not _HEADER_SAFE.fullmatch(token):
        raise TokenRejected("IAM Credentials' answer has no usable accessToken", route=route)
    match = _RFC3339.fullmatch(expire) if isinstance(expire, str) else None
    if match is None:
        raise TokenRejected("IAM Credentials' expireTime is not a timestamp", route=route)
    epoch = calendar.timegm((*(int(p) for p in match.groups()[:6]), 0, 0, 0))
    return AccessToken(
        value=Secret(token),
        token_type="Bearer",  # noqa: S106 - a type name
        issued_at=now,
        expires_at=now + max(0.0, epoch - wall),
        scope=(),
        claims={"expire_time": expire},
    )


# -- I/O edge (through the token client's transport) -------------------------------------------


async def federate(
    client: TokenClient, server: AuthorizationServer, key: TokenKey, route: str
) -> AccessToken:
    """The token client's exchange for ``kind: google_sts`` servers."""
    assert server.token_endpoint is not None
    svid = await client.identity.jwt_svid(server.jwt_svid_audience)
    body = urlencode(sts_form(server, key, svid.token.reveal())).encode("ascii")
    headers = [
        ("Accept", "application/json"),
        ("Content-Type", "application/x-www-form-urlencoded"),
    ]
    sent = [svid.token.reveal()]
    sent_at = client.now()  # a token's life is counted from its request's sending
    status, answer = await client.post(server, server.token_endpoint, body, headers, route)
    token = parse_token_response(
        status,
        answer,
        dpop=False,
        route=route,
        now=client.now(),
        sent_at=sent_at,
        wall=time.time(),
        scrub=Scrubber(sent),
    )
    if server.service_account:
        url, payload = generate_access_token(server, key)
        headers = [
            ("Accept", "application/json"),
            ("Content-Type", "application/json"),
            ("Authorization", f"Bearer {token.value.reveal()}"),
        ]
        sent.append(token.value.reveal())
        sent_at = client.now()
        status, answer = await client.post(server, url, payload, headers, route)
        token = parse_generated(
            status, answer, route=route, now=sent_at, wall=time.time(), scrub=Scrubber(sent)
        )
    audit.info(
        "google token issued",
        extra={
            "event": "token_issued",
            "route": route,
            "authorization_server": server.name,
            "provider": server.provider,
            "service_account": server.service_account,
            "scope": " ".join(key.scopes),
            "token_type": "Bearer",
            "expires_in": round(token.lifetime),
        },
    )
    return token
