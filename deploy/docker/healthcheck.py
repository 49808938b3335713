"""The image's HEALTHCHECK: exit 0 when GET /health/ready answers 200, else 1. Standard library only.

It asks the address the server listens on (SIMPLENN_HOST, with 0.0.0.0 / :: meaning loopback) and
SIMPLENN_PORT, so it follows `-e SIMPLENN_PORT=...` without changes to the image.
"""

import http.client
import os
import sys
import urllib.request


def main() -> int:
    host = os.environ.get("SIMPLENN_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{os.environ.get('SIMPLENN_PORT', '8000')}/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, 503, timeout, bad port...
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
