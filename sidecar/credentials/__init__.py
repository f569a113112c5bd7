"""Credentials: what gets attached to a request.

identity -> token cache -> token client -> kinds (``kind.py``: the seam; ``kinds/``: dpop,
bearer). :class:`~sidecar.credentials.broker.Credentials` gives each route its kind; the data
path holds only a :class:`~sidecar.credentials.kind.Credential`. Nothing here imports the proxy
room: the token client is handed its HTTP transport.
"""
