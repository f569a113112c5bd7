"""The kinds of credential a route can name, each behind :mod:`sidecar.credentials.kind`.

``oauth``: an OAuth access token, sent as ``DPoP`` (with a fresh proof) or ``Bearer``.
``static_header``: secrets read from files (API keys), ``credential: header``.
"""
