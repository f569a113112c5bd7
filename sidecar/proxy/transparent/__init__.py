"""Transparent capture (#19): the app's outbound TCP, redirected by the pod's nat rules.

original_dst.py  where the app was going (SO_ORIGINAL_DST, IPv4 and IPv6)
sni.py           the ClientHello's server name (pure, bounded, fails closed)
peek.py          what the first bytes are: TLS (SNI), an HTTP head (Host), or something else
capture.py       the listener's entry: decide routed / tunnel / passthrough / deny
pipe.py          a blind TCP relay with backpressure both ways
rules.py         the iptables rules (pure; ``sidecar iptables`` applies them)
"""
