"""AWS STS AssumeRoleWithWebIdentity (pure): the request form and the answer, as values.

The JWT-SVID (audience ``sts.amazonaws.com`` unless configured) is the ``WebIdentityToken``;
the IAM role's trust policy names the SPIRE OIDC issuer and the SPIFFE ID (``sub``). The call
needs no signature (STS API reference, AssumeRoleWithWebIdentity: "you do not need to use AWS
security credentials"). Query API, ``Version=2011-06-15``, form-encoded POST; the answer is
XML, parsed with :mod:`xml.etree` from a peer verified over TLS and capped in size by the
transport (no entity expansion reaches us beyond that cap: expat refuses external entities).

The session credentials are held as an :class:`AwsSession`, an
:class:`~sidecar.credentials.token_client.AccessToken` whose ``value`` is the session token,
so the token cache keeps them like tokens (refresh ahead, single flight, backoff, never
expired) without knowing what they are.
"""

from __future__ import annotations

import calendar
import hashlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

from sidecar.config import AuthorizationServer
from sidecar.credentials.token_client import AccessToken, TokenClient, TokenKey
from sidecar.errors import Scrubber, TokenRejected, TokenUnavailable
from sidecar.secret import Secret

audit = logging.getLogger("sidecar.audit")

VERSION = "2011-06-15"
_NS = re.compile(r"^\{[^}]*\}")
_SESSION_CHARS = re.compile(r"[^\w+=,.@-]", re.ASCII)
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
# The error codes AssumeRoleWithWebIdentity documents (STS API reference) and the common ones:
# shown to the app; anything else is "unknown" (a peer's text never reaches an error body).
STS_ERRORS = frozenset(
    {
        "AccessDenied",
        "ExpiredTokenException",
        "IDPCommunicationError",
        "IDPRejectedClaim",
        "InvalidIdentityToken",
        "MalformedPolicyDocument",
        "PackedPolicyTooLarge",
        "RegionDisabledException",
        "InvalidParameterValue",
        "InvalidParameterCombination",
        "MissingParameter",
        "ValidationError",
        "Throttling",
        "InternalFailure",
        "ServiceUnavailable",
    }
)


@dataclass(frozen=True)
class AwsSession(AccessToken):
    """STS session credentials: ``value`` is the session token (``X-Amz-Security-Token``)."""

    access_key_id: str = ""  # an identifier, not a secret; still never logged by us
    secret_key: Secret = field(default_factory=lambda: Secret(""))


def session_name(spiffe_id: str) -> str:
    """RoleSessionName from the SPIFFE ID under IAM's rules ([\\w+=,.@-]{2,64}): the ID
    without its scheme, other characters as ``-``; a longer one keeps its start and gets a
    hash of the whole ID, so two workloads never share a name (CloudTrail shows it)."""
    text = _SESSION_CHARS.sub("-", spiffe_id.removeprefix("spiffe://")).strip("-") or "spiffe"
    if len(text) > 64:
        digest = hashlib.sha256(spiffe_id.encode()).hexdigest()[:10]
        text = f"{text[:53]}-{digest}"
    return text if len(text) >= 2 else f"{text}--"[:2]


def assume_role_form(
    server: AuthorizationServer, web_identity_token: str, spiffe_id: str
) -> dict[str, str]:
    assert server.role_arn is not None  # validated for kind aws_sts
    return {
        "Action": "AssumeRoleWithWebIdentity",
        "Version": VERSION,
        "RoleArn": server.role_arn,
        "RoleSessionName": server.session_name or session_name(spiffe_id),
        "WebIdentityToken": web_identity_token,
        "DurationSeconds": str(server.duration),
    }


def _children(element: ElementTree.Element) -> dict[str, ElementTree.Element]:
    return {_NS.sub("", child.tag): child for child in element}


def _path(root: ElementTree.Element, *names: str) -> ElementTree.Element | None:
    node: ElementTree.Element | None = root
    for name in names:
        if node is None:
            return None
        node = _children(node).get(name)
    return node


def _text(root: ElementTree.Element, *names: str) -> str | None:
    node = _path(root, *names)
    return None if node is None or node.text is None else node.text.strip()


def parse_response(
    status: int,
    body: bytes,
    *,
    route: str,
    now: float,
    wall: float | None = None,
    scrub: Scrubber | None = None,
) -> AwsSession:
    """The STS answer as session credentials, or the error the app will see: a documented
    error ``Code`` (else ``unknown``); the ``Message`` only as ``peer_text`` for the log,
    scrubbed of what was sent (the JWT-SVID), or dropped."""
    try:
        # The peer is the operator's STS over verified TLS and the answer is capped at 64 KiB;
        # expat (>= 2.4) refuses external entities and bounds entity amplification.
        root = ElementTree.fromstring(body)  # noqa: S314 - see above; defusedxml not needed
    except ElementTree.ParseError:
        root = None
    if status != 200:
        raw = _text(root, "Error", "Code") if root is not None else None
        code = raw if raw in STS_ERRORS else "unknown"
        message = _text(root, "Error", "Message") if root is not None else None
        peer_text = scrub.scrub(message) if scrub and message else None
        if status >= 500 or status == 429 or code in ("Throttling", "IDPCommunicationError"):
            raise TokenUnavailable(
                f"AWS STS is unavailable (HTTP {status})",
                route=route,
                upstream_error=code,
                peer_text=peer_text,
            )
        raise TokenRejected(
            f"AWS STS refused AssumeRoleWithWebIdentity ({code}, HTTP {status})",
            route=route,
            upstream_error=code,
            peer_text=peer_text,
        )
    if root is None:
        raise TokenRejected("AWS STS answered with something that is not XML", route=route)
    result = ("AssumeRoleWithWebIdentityResult",)
    creds = (*result, "Credentials")
    key_id = _text(root, *creds, "AccessKeyId")
    secret = _text(root, *creds, "SecretAccessKey")
    token = _text(root, *creds, "SessionToken")
    expiration = _text(root, *creds, "Expiration")
    if not (key_id and secret and token and expiration):
        raise TokenRejected("AWS STS's answer has no complete Credentials", route=route)
    if not all(_HEADER_SAFE.fullmatch(v) for v in (key_id, secret, token)):
        raise TokenRejected(
            "AWS STS's credentials have characters a signature header cannot carry", route=route
        )
    lifetime = _seconds_until(expiration, time.time() if wall is None else wall)
    if lifetime is None:
        raise TokenRejected("AWS STS's Expiration is not a timestamp", route=route)
    claims: dict[str, Any] = {
        "sub": _text(root, *result, "AssumedRoleUser", "Arn"),
        "subject_from_web_identity_token": _text(root, *result, "SubjectFromWebIdentityToken"),
        "expiration": expiration,
    }
    return AwsSession(
        value=Secret(token),
        token_type="Bearer",  # noqa: S106 - a type name; the session token signs along (SigV4)
        issued_at=now,
        expires_at=now + lifetime,
        scope=(),
        claims={k: v for k, v in claims.items() if v},
        access_key_id=key_id,
        secret_key=Secret(secret),
    )


def _seconds_until(expiration: str, wall: float) -> float | None:
    """ISO 8601 UTC (``2026-12-02T06:00:00Z``, fractions allowed) minus now, at least 0."""
    match = re.fullmatch(
        r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(\.\d+)?(Z|\+00:00)", expiration
    )
    if not match:
        return None
    parts = tuple(int(p) for p in match.groups()[:6])
    epoch = calendar.timegm((*parts, 0, 0, 0))
    return max(0.0, epoch - wall)


# -- I/O edge (through the token client's transport) -------------------------------------------


async def assume_role(
    client: TokenClient, server: AuthorizationServer, key: TokenKey, route: str
) -> AccessToken:
    """The token client's exchange for ``kind: aws_sts`` servers."""
    assert server.token_endpoint is not None  # validated: region or token_endpoint
    svid = await client.identity.jwt_svid(server.jwt_svid_audience)
    form = assume_role_form(server, svid.token.reveal(), svid.spiffe_id)
    headers = [
        ("Accept", "application/xml"),
        ("Content-Type", "application/x-www-form-urlencoded; charset=utf-8"),
    ]
    body = urlencode(form).encode("ascii")
    sent_at = client.now()  # the session's life is counted from here, not from the answer
    status, answer = await client.post(server, server.token_endpoint, body, headers, route)
    session = parse_response(
        status, answer, route=route, now=sent_at, scrub=Scrubber([svid.token.reveal()])
    )
    audit.info(
        "aws session issued",
        extra={
            "event": "aws_session_issued",
            "route": route,
            "authorization_server": server.name,
            "role_arn": server.role_arn,
            "session_name": form["RoleSessionName"],
            "assumed_role": session.claims.get("sub"),
            "expires_in": round(session.lifetime),
        },
    )
    return session
