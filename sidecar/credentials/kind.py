"""The credential seam: what a route attaches to its requests, whatever kind of credential it is.

A route names a kind (today ``dpop`` and ``bearer``: an OAuth access token, see
:mod:`sidecar.credentials.kinds.oauth`). The forwarder holds a :class:`Credential` and never
asks which kind it is. Per request, in this order:

1. ``ready(route, scopes)``: the held credential if it can be used now, without awaiting (the
   usual case: a cached token); else ``await prepare(route, scopes)``, which may wait for a
   fetch (a token request, STS session credentials) and says whether a cache answered.
2. The app's headers named in ``strips`` are removed before anything is sent (or, on a route
   with ``app_credentials: refuse``, the request is refused): they are the kind's to set.
3. ``header_lines(held, method, origin, path, query, headers, body_digest)``: the header
   lines to add, each ending in CRLF, computed from what is actually sent: the method, the
   origin (``scheme://host[:port]``, lower-case, default port dropped), the raw path and query
   as sent, the headers forwarded (name, value) and, when ``wants_body_digest`` is set, the
   lower-case hex SHA-256 of the body (of the empty body when there is none; ``None`` when
   the body is streamed: it is not known before it is sent). Pure: no I/O, no await. Values
   must not contain CR or LF.
4. ``learn(origin, answer)`` with every answer (a DPoP server nonce arrives on any response).
5. After a 401 on a replayable request, at most once: ``retry_reason(answer)`` says why one more
   attempt could succeed (``None``: the answer goes to the app), and ``await again(held, route,
   scopes, reason)`` gives the credential for that attempt (the same one, or a new one after the
   rejected one was dropped).

``reference(held)`` says who the credential is for the audit line, never its value.

Kinds that issue #20 adds fit the same contract:

- AWS SigV4: ``prepare`` gets session credentials from STS (cached, refreshed ahead like a
  token); ``wants_body_digest = True``; ``header_lines`` signs the canonical request from the
  method, the host of ``origin``, ``path``, ``query`` and the signed ``headers``, with
  ``x-amz-content-sha256`` = ``body_digest`` or ``UNSIGNED-PAYLOAD``, and returns
  ``Authorization``, ``X-Amz-Date`` and ``X-Amz-Security-Token`` lines; ``strips`` those
  names so the app cannot sign for us.
- Static header secrets: ``prepare`` reads the file (re-read when it changes); ``header_lines``
  returns ``<name>: <secret>``; ``strips`` the header names.

The held value's type is the kind's own (``H``): the forwarder passes it back unopened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from sidecar.routing import Route

H = TypeVar("H")


class Answer(Protocol):
    """What a kind may read of the upstream's answer (the origin client's response is one)."""

    status: int

    def get(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or None."""
        ...

    def getall(self, name: bytes) -> list[bytes]: ...


class Credential(Protocol[H]):
    """One kind of credential, as the forwarder sees it (see the module docstring)."""

    strips: frozenset[str]  # lower-case app header names this kind sets itself
    wants_body_digest: bool  # pass the SHA-256 of a buffered body to header_lines

    def ready(self, route: Route, scopes: tuple[str, ...]) -> H | None: ...

    async def prepare(self, route: Route, scopes: tuple[str, ...]) -> tuple[H, bool]:
        """The credential for a request, and whether it came from a cache."""
        ...

    def reference(self, held: H) -> Mapping[str, Any]: ...

    def header_lines(
        self,
        held: H,
        method: str,
        origin: str,
        path: str,
        query: str,
        headers: Sequence[tuple[str, str]],
        body_digest: str | None,
    ) -> str: ...

    def learn(self, origin: str, answer: Answer) -> None: ...

    def retry_reason(self, answer: Answer) -> str | None: ...

    async def again(self, held: H, route: Route, scopes: tuple[str, ...], reason: str) -> H: ...
