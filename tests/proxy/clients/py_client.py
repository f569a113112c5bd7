"""A Python app calling https:// through HTTPS_PROXY, trusting what the environment says.

Usage: py_client.py requests|urllib|httpx METHOD URL. Prints the status, then the body.
"""

from __future__ import annotations

import sys
import urllib.request

BODY = b'{"customer": "ACME", "lines": [1, 2, 3]}'


def main() -> int:
    kind, method, url = sys.argv[1:4]
    body = BODY if method == "POST" else None
    headers = {"Content-Type": "application/json"} if body else {}
    if kind == "requests":
        import requests

        resp = requests.request(method, url, data=body, headers=headers, timeout=30)
        print(resp.status_code)
        print(resp.text)
    elif kind == "httpx":
        import httpx

        answer = httpx.request(method, url, content=body, headers=headers, timeout=30)
        print(answer.status_code)
        print(answer.text)
    else:
        request = urllib.request.Request(url, data=body, method=method, headers=headers)  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as got:  # noqa: S310 - the test's URL
            print(got.status)
            print(got.read().decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
