"""The bytes: the app-facing listener, CONNECT tunnels, the forwarder's policy, the origin
client, flow control and header hygiene."""
