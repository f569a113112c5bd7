"""The credential broker: each route's kind of credential, and the tokens behind the OAuth ones.

identity -> token cache -> token client, behind :meth:`Credentials.cached` (a usable cached
token, no await) and :meth:`Credentials.lookup` (cached, refreshed ahead, single flight).
:meth:`Credentials.kind` gives the forwarder a route's :class:`~sidecar.credentials.kind.Credential`
(:mod:`sidecar.credentials.kinds`), the only thing it holds.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.config import AuthorizationServer
from sidecar.credentials.dpop import DpopKey, NonceStore
from sidecar.credentials.identity import WorkloadIdentity
from sidecar.credentials.kind import Credential
from sidecar.credentials.kinds.aws_sigv4 import AwsSigV4
from sidecar.credentials.kinds.oauth import BearerToken, DpopToken
from sidecar.credentials.kinds.static_header import SecretFiles, StaticHeaders
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
        *,
        observe: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall  # SigV4's X-Amz-Date
        self.identity = identity
        self.client = client
        self.cache = cache
        self.dpop_key = dpop_key
        self.nonces = nonces
        self._kinds: dict[str, Credential[Any]] = {
            "dpop": DpopToken(self, dpop_key, nonces),
            "bearer": BearerToken(self),
        }
        # Kinds whose state is the route's own (its header names, its files): one per Route
        # object, so a reloaded config never reuses an old route's.
        self._files = SecretFiles(observe)
        self._per_route: dict[int, tuple[Route, Credential[Any]]] = {}
        # (route, scopes, SPIFFE ID) -> (route, key, fetch); the route object itself is kept
        # and compared, so a reloaded config (new Route objects) can never be served a key
        # built for the old one.
        self._keys: dict[
            tuple[int, tuple[str, ...], str],
            tuple[Route, TokenKey, Fetch],
        ] = {}

    def config_applied(self) -> None:
        """A new config is in force: the keys built for the old one's routes go (they hold
        those routes); tokens stay cached by :class:`TokenKey` value, so an unchanged route
        finds its token again. The per-route kinds (header, aws_sigv4) go too: a header route's
        files are stat'ed again by its new instance (SecretFiles keeps what was read)."""
        self._keys.clear()
        self._per_route.clear()

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def kind(self, route: Route) -> Credential[Any]:
        """The kind of credential ``route`` attaches (config validated the name)."""
        name = route.destination.credential
        if name in self._kinds:
            return self._kinds[name]
        return self._route_kind(route)

    def _route_kind(self, route: Route) -> Credential[Any]:
        found = self._per_route.get(id(route))
        if found is not None and found[0] is route:
            return found[1]
        if len(self._per_route) > 4096:  # reloads: old routes are not kept forever
            self._per_route.clear()
        dest = route.destination
        kind: Credential[Any]
        if dest.credential == "aws_sigv4":
            assert dest.aws_service is not None  # validated: configured or derived
            assert dest.aws_region is not None
            kind = AwsSigV4(self, dest.aws_service, dest.aws_region, self._wall)
        else:
            kind = StaticHeaders(route, self._files, self._clock)
        self._per_route[id(route)] = (route, kind)
        return kind

    def standing(self, route: Route) -> tuple[str, str]:
        """For a route whose kind needs no authorization server (header): whether it can
        attach its credential now, as (``ready`` | ``pending`` | ``failing``, why)."""
        kind = self._route_kind(route)
        assert isinstance(kind, StaticHeaders)
        if kind.loaded:
            return "ready", "its secret files were read"
        if kind.last_error is None:
            return "pending", "its secret files have not been read yet"
        return "failing", kind.last_error

    async def warm(self, route: Route, scopes: tuple[str, ...]) -> None:
        """Obtain what ``route``'s kind attaches (start-up prefetch), whatever the kind."""
        await self.kind(route).prepare(route, scopes)

    def _key(
        self,
        route: Route,
        scopes: tuple[str, ...],
        jkt: str | None,
        spiffe_id: str,
    ) -> tuple[TokenKey, Fetch]:
        # jkt is not in it: a route's kind, hence its jkt, is fixed for the Route object.
        cache_key = (id(route), scopes, spiffe_id)
        cached = self._keys.get(cache_key)
        if cached is not None and cached[0] is route:
            return cached[1], cached[2]
        server = _server(route)
        dest = route.destination
        key = TokenKey(
            server=server.name,
            client_id=server.client_id or spiffe_id,
            grant=server.grant,
            resource=dest.resource,
            audience=dest.audience,
            scopes=tuple(sorted(set(scopes))),  # one token per scope *set*
            jkt=jkt,  # the DPoP key a token is bound to (RFC 9449 §6): part of what shapes it
        )
        client = self.client

        def fetch(key: TokenKey) -> Awaitable[AccessToken]:
            return client.fetch(server, key, route.name)

        if len(self._keys) > 4096:  # bounded: wildcard routes, many scope sets
            self._keys.clear()
        self._keys[cache_key] = (route, key, fetch)
        return key, fetch

    def _identity_now(self, route: Route) -> str | None:
        """The SPIFFE ID a token for ``route`` is for, if usable now. For ``mtls`` client
        auth only while the X.509-SVID that authenticates us is valid: past its notAfter no
        token is served on those routes (fail closed, as readiness says).

        The certificate is not part of the key: tokens are bound to the DPoP key (or are
        Bearer), never to the certificate, which this sidecar presents only to the AS. An
        X.509-SVID rotation therefore costs no token request and makes no request wait; the
        next renewal authenticates with the new certificate."""
        server = route.server  # _server(route), inlined: on every request
        assert server is not None, f"route {route.name} has no authorization server"
        if server.client_auth == "mtls":
            svid = self.identity.x509
            return None if svid is None else svid.spiffe_id
        return self.identity.spiffe_id

    async def _identity(self, route: Route) -> str:
        known = self._identity_now(route)
        if known is not None:
            return known
        server = _server(route)
        if server.client_auth == "mtls":
            return (await self.identity.x509_svid()).spiffe_id
        # First request before any SVID was seen: learn our SPIFFE ID.
        return (await self.identity.jwt_svid(server.jwt_svid_audience)).spiffe_id

    def cached(
        self, route: Route, scopes: tuple[str, ...], jkt: str | None
    ) -> tuple[TokenKey, AccessToken] | None:
        """The token for a request when the cache has a usable one now (no await), else None:
        then :meth:`lookup`. The data path's usual case."""
        spiffe_id = self._identity_now(route)
        if spiffe_id is None:
            return None
        found = self._keys.get((id(route), scopes, spiffe_id))  # _key's hit, inlined
        if found is not None and found[0] is route:
            key, fetch = found[1], found[2]
        else:
            key, fetch = self._key(route, scopes, jkt, spiffe_id)
        token = self.cache.fresh(key, fetch)
        return None if token is None else (key, token)

    async def token(self, route: Route, scopes: tuple[str, ...]) -> tuple[TokenKey, AccessToken]:
        """What ``route``'s kind attaches, fetched now if need be (prefetch, ``explain
        --fetch``): for the OAuth kinds, ``(TokenKey, AccessToken)``."""
        held, _ = await self.kind(route).prepare(route, scopes)
        key, token = held
        return key, token

    async def lookup(
        self, route: Route, scopes: tuple[str, ...], jkt: str | None
    ) -> tuple[TokenKey, AccessToken, bool]:
        """The token for a request, and whether the cache had it."""
        key, fetch = self._key(route, scopes, jkt, await self._identity(route))
        token, hit = await self.cache.lookup(key, fetch)
        return key, token, hit

    def evict(self, key: TokenKey, token: AccessToken) -> None:
        self.cache.evict(key, token)


def _server(route: Route) -> AuthorizationServer:
    """The authorization server of an OAuth route (config requires one for those kinds)."""
    assert route.server is not None, f"route {route.name} has no authorization server"
    return route.server
