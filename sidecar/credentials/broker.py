"""The credential broker: what the data path asks for a request's Authorization.

identity -> token cache -> token client -> dpop, behind two calls: :meth:`Credentials.token`
(cached, refreshed ahead, single-flight) and :meth:`Credentials.headers` (a fresh proof per
request).
"""

from __future__ import annotations

from collections.abc import Awaitable

from sidecar.credentials.dpop import DpopKey, NonceStore
from sidecar.credentials.identity import WorkloadIdentity
from sidecar.credentials.token_cache import Fetch, TokenCache
from sidecar.credentials.token_client import AccessToken, TokenClient, TokenKey
from sidecar.routing import Route


class Credentials:
    def __init__(
        self,
        identity: WorkloadIdentity,
        client: TokenClient,
        cache: TokenCache,
        dpop_key: DpopKey,
        nonces: NonceStore,
    ) -> None:
        self.identity = identity
        self.client = client
        self.cache = cache
        self.dpop_key = dpop_key
        self.nonces = nonces
        # (route, scopes, identity) -> (route, key, fetch); the route object itself is kept
        # and compared, so a reloaded config (new Route objects) can never be served a key
        # built for the old one.
        self._keys: dict[
            tuple[int, tuple[str, ...], str | None, str | None],
            tuple[Route, TokenKey, Fetch],
        ] = {}

    def config_applied(self) -> None:
        """A new config is in force: the keys built for the old one's routes go (they hold
        those routes); tokens stay cached by :class:`TokenKey` value, so an unchanged route
        finds its token again."""
        self._keys.clear()

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def _key(
        self, route: Route, scopes: tuple[str, ...], spiffe_id: str, x509: str | None
    ) -> tuple[TokenKey, Fetch]:
        cache_key = (id(route), scopes, spiffe_id, x509)
        cached = self._keys.get(cache_key)
        if cached is not None and cached[0] is route:
            return cached[1], cached[2]
        server = route.server
        dest = route.destination
        key = TokenKey(
            server=server.name,
            client_id=server.client_id or spiffe_id,
            grant=server.grant,
            resource=dest.resource,
            audience=dest.audience,
            scopes=tuple(sorted(set(scopes))),  # one token per scope *set*
            jkt=self.dpop_key.thumbprint if dest.token_type == "dpop" else None,
            x509=x509,
        )
        client = self.client

        def fetch(key: TokenKey) -> Awaitable[AccessToken]:
            return client.fetch(server, key, route.name)

        if len(self._keys) > 4096:  # bounded: wildcard routes, many scope sets
            self._keys.clear()
        self._keys[cache_key] = (route, key, fetch)
        return key, fetch

    def _identity_now(self, route: Route) -> tuple[str, str | None] | None:
        """(SPIFFE ID, certificate fingerprint) a token for ``route`` depends on, if already
        known: mTLS-bound tokens change with the X.509-SVID, the others with the SPIFFE ID."""
        if route.server.client_auth == "mtls":
            svid = self.identity.x509
            return None if svid is None else (svid.spiffe_id, svid.fingerprint)
        spiffe_id = self.identity.spiffe_id
        return None if spiffe_id is None else (spiffe_id, None)

    async def _identity(self, route: Route) -> tuple[str, str | None]:
        known = self._identity_now(route)
        if known is not None:
            return known
        server = route.server
        if server.client_auth == "mtls":
            svid = await self.identity.x509_svid()
            return svid.spiffe_id, svid.fingerprint
        # First request before any SVID was seen: learn our SPIFFE ID.
        return (await self.identity.jwt_svid(server.jwt_svid_audience)).spiffe_id, None

    def cached(self, route: Route, scopes: tuple[str, ...]) -> tuple[TokenKey, AccessToken] | None:
        """The token for a request when the cache has a usable one now (no await), else None:
        then :meth:`lookup`. The data path's usual case."""
        identity = self._identity_now(route)
        if identity is None:
            return None
        key, fetch = self._key(route, scopes, *identity)
        token = self.cache.fresh(key, fetch)
        return None if token is None else (key, token)

    async def token(self, route: Route, scopes: tuple[str, ...]) -> tuple[TokenKey, AccessToken]:
        key, token, _ = await self.lookup(route, scopes)
        return key, token

    async def lookup(
        self, route: Route, scopes: tuple[str, ...]
    ) -> tuple[TokenKey, AccessToken, bool]:
        """The token for a request, and whether the cache had it."""
        key, fetch = self._key(route, scopes, *await self._identity(route))
        token, hit = await self.cache.lookup(key, fetch)
        return key, token, hit

    def evict(self, key: TokenKey, token: AccessToken) -> None:
        self.cache.evict(key, token)

    def authorization(self, token: AccessToken, method: str, htu: str, origin: str) -> str:
        """``Authorization`` (and ``DPoP``, RFC 9449 §7.1) header lines for one request to
        ``htu``, each ending in CRLF. The token's characters were checked when it was issued
        (visible ASCII only), a proof is base64url: neither can split a header."""
        value = token.value.reveal()
        if token.token_type == "Bearer":
            return f"Authorization: Bearer {value}\r\n"
        proof = self.dpop_key.proof(method, htu, ath=token.ath, nonce=self.nonces.get(origin))
        return f"Authorization: DPoP {value}\r\nDPoP: {proof}\r\n"
