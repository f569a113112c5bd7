"""DEVELOPMENT ONLY: local peers for the demo and the test suite.

Nothing here is used by `sidecar run`. These are strict test peers (they really validate what
they receive), not mocks: a dev SPIFFE Workload API over a unix socket, a dev OAuth
authorization server and a dev "SaaS" resource server, all on loopback with a dev CA.
"""
