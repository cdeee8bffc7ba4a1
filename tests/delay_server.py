"""A stand-in /generate endpoint that answers after a fixed delay, with no model: it calibrates
the load tester itself (its accuracy tests, `benchmarks/loadtest_capacity.py`).

    python tests/delay_server.py --delay 0.1 --port 0

Requests are answered concurrently (asyncio.sleep), so a closed loop of N workers against a
delay d must measure latency d and throughput N / d; anything else is the client's error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import stat
import sys

from aiohttp import web


def create_app(delay_s: float) -> web.Application:
    body = json.dumps({
        "generated_text": "", "tokens_generated": 1, "prompt_tokens": 1, "queue_time_ms": 0.0,
        "inference_time_ms": delay_s * 1000, "time_to_first_token_ms": delay_s * 1000,
        "total_time_ms": delay_s * 1000, "model": f"delay server ({delay_s * 1000:g} ms, no model)",
        "device": "cpu", "gpu_name": None, "synthetic": False,
    }).encode()

    async def generate(request: web.Request) -> web.Response:
        await request.read()
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.Response(body=body, content_type="application/json")

    async def root(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model_loaded": True})

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/", root)
    return app


async def serve(delay_s: float, host: str, port: int) -> None:
    runner = web.AppRunner(create_app(delay_s), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    # The same announcement as labkit serve, so labkit.serve.launcher can start this server too.
    print(f"Serving on http://{host}:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):  # launched: stop when the pipe closes
        loop.add_reader(sys.stdin.fileno(), lambda: os.read(0, 4096) or stop.set())
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.delay, args.host, args.port))


if __name__ == "__main__":
    main()
