"""Wait until a `minisgl serve` on this machine answers /health (for the GPU scripts): exit 0 once it does,
1 after TIMEOUT seconds. Usage: python3 scripts/wait_healthy.py PORT [TIMEOUT]"""

import sys
import time

import httpx


def main() -> int:
    port = sys.argv[1]
    deadline = time.monotonic() + (float(sys.argv[2]) if len(sys.argv) > 2 else 300.0)
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return 0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    print(f"the server on port {port} did not become healthy", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
