"""spiffe-oauth-sidecar: trade the pod's SPIFFE identity for DPoP-bound OAuth tokens.

The package reads as the data flow of one request:

    listener -> routing -> credentials (identity -> token cache -> token client -> dpop) -> upstream
"""

__version__ = "0.1.0"
