"""Run the real labkit server (labkit.serve.http.serve) with the stub model, as a subprocess:
`python tests/stub_server.py --delay 1.0`. For signal and lifecycle tests; with
`--token-delay`, a one-at-a-time server of known speed (the sweep's CLI test)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from stub_backend import StubBackend

from labkit.serve.http import create_app
from labkit.serve.lifecycle import serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--watch-parent", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    backend = StubBackend(delay_s=args.delay, token_delay_s=args.token_delay)
    sys.exit(asyncio.run(serve(create_app(lambda: backend), "127.0.0.1", 0,
                               watch_parent=args.watch_parent)))
