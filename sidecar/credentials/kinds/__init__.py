"""The kinds of credential a route can name, each behind :mod:`sidecar.credentials.kind`.

``oauth``: an OAuth access token, sent as ``DPoP`` (with a fresh proof) or ``Bearer``.
Issue #20 adds ``sigv4`` and ``static_header`` modules here.
"""
