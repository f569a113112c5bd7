"""OAuth access tokens as a kind of credential: ``dpop`` (RFC 9449) and ``bearer`` (RFC 6750).

Both hold ``(TokenKey, AccessToken)`` from the broker's :class:`TokenSource` (cached, refreshed
ahead, single flight) and retry once on a 401 that a new attempt can fix: ``invalid_token``
(the token is dropped and a new one fetched) and, for DPoP, ``use_dpop_nonce`` with a
``DPoP-Nonce`` (RFC 9449 §9: a new proof carrying it). They strip the app's ``Authorization``
and ``DPoP`` headers: an upstream that sees two may pick either.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sidecar.credentials.dpop import DpopKey, NonceStore
from sidecar.credentials.kind import Answer
from sidecar.credentials.token_client import AccessToken, TokenKey
from sidecar.routing import Route

log = logging.getLogger("sidecar.upstream")  # ops filter on the data path's logger name

Held = tuple[TokenKey, AccessToken]
APP_CREDENTIALS = frozenset({"authorization", "dpop"})
_CHALLENGE_ERROR = re.compile(r'error\s*=\s*"?([a-z_]+)"?', re.IGNORECASE)


class TokenSource(Protocol):
    """Tokens for a route and scope set, bound to ``jkt`` when given (the broker)."""

    def cached(self, route: Route, scopes: tuple[str, ...], jkt: str | None) -> Held | None: ...

    async def lookup(
        self, route: Route, scopes: tuple[str, ...], jkt: str | None
    ) -> tuple[TokenKey, AccessToken, bool]: ...

    def evict(self, key: TokenKey, token: AccessToken) -> None: ...


def challenge_error(answer: Answer) -> str | None:
    """The ``error`` of a ``DPoP`` or ``Bearer`` challenge (RFC 6750 §3, RFC 9449 §7.1)."""
    for raw in answer.getall(b"www-authenticate"):
        value = raw.decode("latin-1")
        if value.lstrip().lower().startswith(("dpop", "bearer")):
            match = _CHALLENGE_ERROR.search(value)
            if match:
                return match.group(1).lower()
    return None


class BearerToken:
    """``Authorization: Bearer <token>``: the route chose Bearer explicitly."""

    strips = APP_CREDENTIALS
    wants_body_digest = False
    jkt: str | None = None  # what the token is bound to: nothing

    def __init__(self, tokens: TokenSource) -> None:
        self._tokens = tokens

    def ready(self, route: Route, scopes: tuple[str, ...]) -> Held | None:
        return self._tokens.cached(route, scopes, self.jkt)

    async def prepare(self, route: Route, scopes: tuple[str, ...]) -> tuple[Held, bool]:
        key, token, hit = await self._tokens.lookup(route, scopes, self.jkt)
        return (key, token), hit

    def reference(self, held: Held) -> Mapping[str, Any]:
        return held[1].reference

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
        # The token's characters were checked when it was issued (visible ASCII only).
        return f"Authorization: Bearer {held[1].value.reveal()}\r\n"

    def learn(self, origin: str, answer: Answer) -> None:
        return None

    def retry_reason(self, answer: Answer) -> str | None:
        return "invalid_token" if challenge_error(answer) == "invalid_token" else None

    async def again(self, held: Held, route: Route, scopes: tuple[str, ...], reason: str) -> Held:
        if reason != "invalid_token":
            return held
        self._tokens.evict(*held)
        log.info(
            "resource server rejected the token; fetching a new one", extra={"route": route.name}
        )
        key, token, _ = await self._tokens.lookup(route, scopes, self.jkt)
        return key, token


class DpopToken(BearerToken):
    """``Authorization: DPoP <token>`` and ``DPoP: <proof>`` (RFC 9449 §7.1): a new proof per
    attempt for the URL actually sent, with the origin's latest nonce."""

    def __init__(self, tokens: TokenSource, key: DpopKey, nonces: NonceStore) -> None:
        super().__init__(tokens)
        self._key = key
        self._nonces = nonces
        self.jkt = key.thumbprint  # RFC 9449 §6: the token is bound to this key (cnf.jkt)

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
        token = held[1]
        # RFC 9449 §4.2: htu is the URL without query and fragment. A proof is base64url.
        proof = self._key.proof(
            method, origin + path, ath=token.ath, nonce=self._nonces.get(origin)
        )
        return f"Authorization: DPoP {token.value.reveal()}\r\nDPoP: {proof}\r\n"

    def learn(self, origin: str, answer: Answer) -> None:
        nonce = answer.get(b"dpop-nonce")  # RFC 9449 §8.2: from any response
        if nonce:
            self._nonces.update(origin, nonce.decode("latin-1"))

    def retry_reason(self, answer: Answer) -> str | None:
        reason = challenge_error(answer)
        if reason == "use_dpop_nonce":
            # RFC 9449 §9: retry once with a new proof carrying the server's nonce.
            return reason if answer.get(b"dpop-nonce") else None
        return "invalid_token" if reason == "invalid_token" else None

    async def again(self, held: Held, route: Route, scopes: tuple[str, ...], reason: str) -> Held:
        if reason == "use_dpop_nonce":
            log.info("retrying with the resource server's DPoP nonce", extra={"route": route.name})
            return held
        return await super().again(held, route, scopes, reason)
