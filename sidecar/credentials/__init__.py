"""Credentials: identity -> token cache -> token client -> dpop.

:class:`~sidecar.credentials.broker.Credentials` is the one object the data path talks to.
"""
