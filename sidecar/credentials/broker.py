"""The credential broker: what the data path asks for a request's Authorization.

identity -> token cache -> token client -> dpop, behind two calls: :meth:`Credentials.token`
(cached, refreshed ahead, single-flight) and :meth:`Credentials.headers` (a fresh proof per
request).
"""

from __future__ import annotations

from sidecar.credentials.dpop import DpopKey, NonceStore
from sidecar.credentials.identity import WorkloadIdentity
from sidecar.credentials.token_cache import TokenCache
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
        # (route, scopes, identity) -> key; the route object itself is kept and compared, so a
        # reloaded config (new Route objects) can never be served a key built for the old one.
        self._keys: dict[
            tuple[int, tuple[str, ...], str | None, str | None], tuple[Route, TokenKey]
        ] = {}

    async def key_for(self, route: Route, scopes: tuple[str, ...]) -> TokenKey:
        server = route.server
        dest = route.destination
        x509: str | None = None
        spiffe_id: str | None
        if server.client_auth == "mtls":  # certificate-bound: a rotated SVID means a new token
            svid = await self.identity.x509_svid()
            x509, spiffe_id = svid.fingerprint, svid.spiffe_id
        else:
            spiffe_id = self.identity.spiffe_id
            if spiffe_id is None:  # first request before the SVID was seen: learn our SPIFFE ID
                spiffe_id = (await self.identity.jwt_svid(server.jwt_svid_audience)).spiffe_id
        cache_key = (id(route), scopes, spiffe_id, x509)
        cached = self._keys.get(cache_key)
        if cached is not None and cached[0] is route:
            return cached[1]
        client_id = server.client_id or spiffe_id
        key = TokenKey(
            server=server.name,
            client_id=client_id,
            grant=server.grant,
            resource=dest.resource,
            audience=dest.audience,
            scopes=tuple(sorted(set(scopes))),  # one token per scope *set*
            jkt=self.dpop_key.thumbprint if dest.token_type == "dpop" else None,
            x509=x509,
        )
        if len(self._keys) > 4096:  # bounded: wildcard routes, many scope sets
            self._keys.clear()
        self._keys[cache_key] = (route, key)
        return key

    async def token(self, route: Route, scopes: tuple[str, ...]) -> tuple[TokenKey, AccessToken]:
        key, token, _ = await self.lookup(route, scopes)
        return key, token

    async def lookup(
        self, route: Route, scopes: tuple[str, ...]
    ) -> tuple[TokenKey, AccessToken, bool]:
        """The token for a request, and whether the cache had it."""
        key = await self.key_for(route, scopes)
        token, hit = await self.cache.lookup(
            key, lambda k: self.client.fetch(route.server, k, route.name)
        )
        return key, token, hit

    def evict(self, key: TokenKey, token: AccessToken) -> None:
        self.cache.evict(key, token)

    def headers(
        self, token: AccessToken, method: str, htu: str, origin: str
    ) -> list[tuple[str, str]]:
        """``Authorization`` (and ``DPoP``, RFC 9449 §7.1) for one request to ``htu``."""
        value = token.value.reveal()
        if token.token_type == "Bearer":
            return [("Authorization", f"Bearer {value}")]
        proof = self.dpop_key.proof(method, htu, ath=token.ath, nonce=self.nonces.get(origin))
        return [("Authorization", f"DPoP {value}"), ("DPoP", proof)]
