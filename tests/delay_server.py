"""A stand-in endpoint that answers after a fixed delay, with no model: it calibrates the load
tester itself (its accuracy tests, `benchmarks/loadtest_capacity.py`).

    python tests/delay_server.py --delay 0.1 --port 0
    python tests/delay_server.py --api openai --delay 0.1 --chunks 20 --chunk-delay 0.02

Requests are answered concurrently (asyncio.sleep), so a closed loop of N workers against a
delay d must measure latency d and throughput N / d; anything else is the client's error.
With `--token-delay t`, a /generate request also takes t seconds per token it asks for
(max_tokens) and says it generated that many, its first token after `--delay`: requests of
mixed lengths take measurably different times.

`--api openai` also serves an OpenAI-compatible `POST /v1/completions` and `GET /v1/models`:
a stream (server-sent events, as vLLM sends them) whose first chunk carrying text leaves after
`--delay` s, then one every `--chunk-delay` s up to `--chunks`, then a usage chunk (when asked
for with stream_options.include_usage, reporting `--usage-tokens` completion tokens) and
`data: [DONE]`. So a client must measure TTFT = delay, ITL = chunk delay. For the tests, the
prompt can ask for a failure:

    !error         HTTP 400 with an error body in OpenAI's shape
    !stream-error  200, one chunk, then an error event in OpenAI's shape, then [DONE]
    !cut           200, one chunk, then the stream ends without [DONE]
    !drop          200, one chunk, then the connection is closed mid-response

An unknown model gets vLLM's 404 body; with `--api-key KEY`, /v1/ routes want
`Authorization: Bearer KEY` and answer 401 otherwise (echoing the key they got, as a careless
server might: the client must not print it).
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


def create_app(delay_s: float, options: argparse.Namespace | None = None) -> web.Application:
    body = json.dumps({
        "generated_text": "", "tokens_generated": 1, "prompt_tokens": 1, "queue_time_ms": 0.0,
        "inference_time_ms": delay_s * 1000, "time_to_first_token_ms": delay_s * 1000,
        "total_time_ms": delay_s * 1000, "model": f"delay server ({delay_s * 1000:g} ms, no model)",
        "device": "cpu", "gpu_name": None, "synthetic": False,
    }).encode()

    token_delay_s = getattr(options, "token_delay", 0.0) or 0.0

    async def generate(request: web.Request) -> web.Response:
        raw = await request.read()
        if token_delay_s:
            tokens = json.loads(raw)["max_tokens"]
            total_s = delay_s + tokens * token_delay_s
            await asyncio.sleep(total_s)
            return web.json_response({
                **json.loads(body), "tokens_generated": tokens, "inference_time_ms":
                total_s * 1000, "time_to_first_token_ms": delay_s * 1000,
                "total_time_ms": total_s * 1000})
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.Response(body=body, content_type="application/json")

    async def root(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model_loaded": True})

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_get("/", root)
    if options is not None and options.api == "openai":
        add_openai_routes(app, delay_s, options)
    return app


def error_response(status: int, kind: str, message: str, param: str | None = None):
    """An error body in OpenAI's shape, as vLLM sends it."""
    return web.json_response({"error": {"message": message, "type": kind, "param": param,
                                        "code": status}}, status=status)


def add_openai_routes(app: web.Application, delay_s: float, options: argparse.Namespace) -> None:
    models = [m for m in options.models.split(",") if m]
    chunk_count, chunk_delay = options.chunks, options.chunk_delay
    usage_tokens = chunk_count if options.usage_tokens is None else options.usage_tokens
    events: dict[str, tuple[bytes, ...]] = {}  # model -> its encoded events, built once

    def encoded(model: str) -> tuple[bytes, ...]:
        if model not in events:
            def chunk(text: str, finish: str | None = None, **extra) -> bytes:
                return b"data: " + json.dumps({
                    "id": "cmpl-delay", "object": "text_completion", "created": 0,
                    "model": model, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                 "finish_reason": finish}], **extra},
                    separators=(",", ":")).encode() + b"\n\n"

            usage = {"prompt_tokens": 7, "completion_tokens": usage_tokens,
                     "total_tokens": 7 + usage_tokens}
            events[model] = (
                chunk(""),  # [0] an empty chunk: no text, so no first token
                chunk(" tok"),  # [1] a chunk carrying text
                chunk(" end", "length"),  # [2] the last one
                b"data: " + json.dumps({"id": "cmpl-delay", "object": "text_completion",
                                        "created": 0, "model": model, "choices": [],
                                        "usage": usage}, separators=(",", ":")).encode()
                + b"\n\n",  # [3] the usage chunk
                b"data: [DONE]\n\n",  # [4]
            )
        return events[model]

    def refused(request: web.Request) -> web.Response | None:
        if options.api_key is None:
            return None
        got = request.headers.get("Authorization", "")
        if got == f"Bearer {options.api_key}":
            return None
        return error_response(401, "AuthenticationError",
                              f"Incorrect API key provided: {got.removeprefix('Bearer ')!r}")

    async def list_models(request: web.Request) -> web.Response:
        return refused(request) or web.json_response({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "delay"} for m in models]})

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if (answer := refused(request)) is not None:
            return answer
        if body.get("model") not in models:
            return error_response(404, "NotFoundError",
                                  f"The model `{body.get('model')}` does not exist.", "model")
        prompt = body.get("prompt")
        if prompt == "!error":
            return error_response(400, "BadRequestError", "asked for an error", "prompt")
        empty, text, last, usage, done = encoded(body["model"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        if options.empty_first_chunk:
            await response.write(empty)
        if delay_s:
            await asyncio.sleep(delay_s)
        if prompt in ("!stream-error", "!cut", "!drop"):
            await response.write(text)
            if prompt == "!stream-error":
                error = {"error": {"message": "asked for an error in the stream",
                                   "type": "InternalServerError", "param": None, "code": 500}}
                await response.write(b"data: " + json.dumps(error).encode() + b"\n\n" + done)
            elif prompt == "!drop":
                await asyncio.sleep(0.01)  # the chunk leaves first
                request.transport.close()
                return response
            await response.write_eof()
            return response
        for i in range(chunk_count):
            if i and chunk_delay:
                await asyncio.sleep(chunk_delay)
            await response.write(last if i == chunk_count - 1 else text)
        include_usage = (body.get("stream_options") or {}).get("include_usage")
        await response.write(usage + done if include_usage and not options.no_usage else done)
        await response.write_eof()
        return response

    app.router.add_post("/v1/completions", completions)
    if not options.no_models_endpoint:
        app.router.add_get("/v1/models", list_models)


async def serve(delay_s: float, host: str, port: int,
                options: argparse.Namespace | None = None) -> None:
    runner = web.AppRunner(create_app(delay_s, options), access_log=None)
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
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds per request (openai: before the first chunk with text)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-delay", type=float, default=0.0,
                        help="generate: also this many seconds per token asked for (max_tokens)")
    parser.add_argument("--api", choices=("generate", "openai"), default="generate",
                        help="openai: also serve /v1/completions (streamed) and /v1/models")
    parser.add_argument("--chunks", type=int, default=10, help="openai: chunks carrying text")
    parser.add_argument("--chunk-delay", type=float, default=0.0,
                        help="openai: seconds between chunks carrying text")
    parser.add_argument("--models", default="delay-model",
                        help="openai: the served model names, comma-separated")
    parser.add_argument("--usage-tokens", type=int, default=None,
                        help="openai: completion_tokens in the usage chunk (default: --chunks)")
    parser.add_argument("--no-usage", action="store_true", help="openai: never send usage")
    parser.add_argument("--empty-first-chunk", action="store_true",
                        help="openai: send a chunk with empty text as soon as the headers")
    parser.add_argument("--no-models-endpoint", action="store_true",
                        help="openai: no GET /v1/models")
    parser.add_argument("--api-key", default=None, help="openai: require this bearer token")
    args = parser.parse_args(argv)
    if args.chunks < 1:
        parser.error("--chunks must be at least 1")
    asyncio.run(serve(args.delay, args.host, args.port, args))


if __name__ == "__main__":
    main()
