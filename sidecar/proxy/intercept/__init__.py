"""TLS interception for apps that call ``https://``: the pod CA and the server side of TLS."""
