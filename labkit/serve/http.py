"""`labkit serve`: the seed's HTTP inference server on aiohttp.

Endpoints (README, "The HTTP API"): GET / (simple health), GET /health (detailed,
503 while the model loads), POST /generate, GET /stats (device + server counters), GET /metrics
(Prometheus), and the OpenAI-compatible GET /v1/models, POST /v1/completions and
POST /v1/chat/completions (streaming too; their contract lives in `labkit.serve.openai_api`).
Errors leave as `{"error": "..."}`, and on a /v1 path in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`.

The server listens at once and loads the model on a background thread, so readiness is
observable. Requests go through a scheduler (`labkit.serve.schedulers`); the default, sequential
one runs exactly one generation at a time on its own thread, so the event loop keeps answering
health and stats calls within milliseconds while the model works. SIGTERM/SIGINT stop it gracefully:
accepted requests finish, new ones get 503; a second signal stops at once.

For notebooks, `launch()` (from `labkit.serve.launcher`) runs this server as a subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from labkit.engine.request import EngineGone, InvalidRequest, OutOfMemory, PromptTooLong, Request
from labkit.serve import generate_api, openai_api
from labkit.serve.generate_api import ApiError
from labkit.serve.metrics import CONTENT_TYPE, ServerMetrics

if TYPE_CHECKING:
    from labkit.serve.backend import Backend
from labkit.serve.schedulers import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_RUNNING,
    DEFAULT_MAX_WAIT_MS,
    SCHEDULERS,
    Scheduler,
    check_max_batch_size,
    check_max_wait_ms,
    make_scheduler,
)

log = logging.getLogger("labkit.serve.http")

# The launcher looks for this line to learn the actual address (the port may be 0 = any free).
LISTENING_PREFIX = "Serving on "
NOT_LOADED = "Model not loaded"
# Prompts (or /v1 bodies) up to this many characters are tokenized on the event loop, longer
# ones on the check thread (`_off_loop_if_long`).
INLINE_TEXT_CHARS = 4096
SHUTTING_DOWN = ("Server is shutting down: it finishes the requests it already accepted and "
                 "takes no new ones. Retry against a running server.")


class ServerState:
    """Everything the handlers share: model, scheduler, counters, lifecycle flags."""

    def __init__(self, load_backend: Callable[[], Backend], scheduler: Scheduler,
                 max_tokens_limit: int):
        self.load_backend = load_backend
        self.scheduler = scheduler
        self.max_tokens_limit = max_tokens_limit
        self.backend: Backend | None = None
        self.load_error: BaseException | None = None
        self.shutdown_reason: str | None = None
        self.rejected = 0  # generation requests (/generate, /v1/...) answered 4xx (bad input)
        self.loaded = asyncio.Event()
        self.finished_loading = asyncio.Event()  # loaded or failed
        # Long prompts' checks tokenize (up to 1 MiB of text) and device queries may wait for a
        # torch import: both stay off the event loop, on threads of their own.
        self.check_executor = concurrent.futures.ThreadPoolExecutor(1, "labkit-check")
        self.info_executor = concurrent.futures.ThreadPoolExecutor(1, "labkit-info")
        self.metrics = ServerMetrics(self.counters, self._gpu_reading)
        self._nvml_reader = None

    def counters(self) -> dict:
        """The scheduler's counters plus the requests refused as bad input."""
        return {**self.scheduler.stats(), "requests_rejected": self.rejected}

    def _gpu_reading(self) -> dict | None:
        """NVML's columns for the card the model runs on; None without a GPU or a model."""
        if self.backend is None or not self.backend.device.startswith("cuda"):
            return None
        if self._nvml_reader is None:
            from labkit.measure import gpu, utilization

            lib = gpu.nvml()
            if lib is None:
                return None
            index = int(self.backend.device.split(":")[1]) if ":" in self.backend.device else 0
            self._nvml_reader = utilization.NvmlReader(lib, index)
        return self._nvml_reader.read()

    @property
    def model_loaded(self) -> bool:
        return self.backend is not None

    def require_ready(self) -> Backend:
        if self.shutdown_reason is not None:
            raise ApiError(503, SHUTTING_DOWN)
        if self.backend is None:
            raise ApiError(503, NOT_LOADED)
        return self.backend

    def start_loading(self) -> None:
        """Load on a daemon thread: a SIGTERM during a long load must not wait for it."""
        loop = asyncio.get_running_loop()

        def report(callback, outcome) -> None:
            try:
                loop.call_soon_threadsafe(callback, outcome)
            except RuntimeError:  # the loop is closed: the server stopped while this loaded,
                pass  # and its log may be closed too; the load is dropped with the server

        def load() -> None:
            try:
                backend = self.load_backend()
                # On the thread requests will run on: see ModelBackend.warm_up.
                self.scheduler.run_on_generation_thread(backend.warm_up)
            except BaseException as err:  # reported in the log, and the server exits with 1
                report(self._load_failed, err)
            else:
                report(self._load_done, backend)

        threading.Thread(target=load, name="labkit-load", daemon=True).start()

    def _load_done(self, backend: Backend) -> None:
        self.backend = backend
        self.scheduler.set_backend(backend)
        self.loaded.set()
        self.finished_loading.set()

    def _load_failed(self, err: BaseException) -> None:
        self.load_error = err
        log.error("Model failed to load: %s", err)
        self.finished_loading.set()

    async def device_info(self) -> dict:
        """gpu.device_info() for the card the model runs on (card 0 before it has loaded)."""
        from labkit.measure import gpu  # imports torch: done on the info thread, not the loop

        device = self.backend.device if self.backend is not None else "cpu"
        index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
        # An engine in its own process reports its memory itself (here torch holds none).
        engine_memory = getattr(self.backend, "memory_gb", None)
        loop = asyncio.get_running_loop()
        info = await loop.run_in_executor(self.info_executor, gpu.device_info, index,
                                          engine_memory is None)
        if engine_memory is not None:
            info["memory"] = engine_memory()
        return info


STATE = web.AppKey("labkit_state", ServerState)


def create_app(load_backend: Callable[[], Backend], *, max_tokens_limit: int = 1024,
               mode: str = "sequential", **scheduler_options) -> web.Application:
    """The aiohttp application. `load_backend` runs on a background thread at startup; tests
    pass a stub, `labkit serve` passes `load_model_backend` for the chosen model.
    `scheduler_options` go to the mode's scheduler (batched: max_batch_size, max_wait_ms)."""
    app = web.Application(middlewares=[_errors_as_json],
                          client_max_size=generate_api.MAX_BODY_BYTES)
    state = ServerState(load_backend, make_scheduler(mode, **scheduler_options), max_tokens_limit)
    app[STATE] = state
    app.router.add_get("/", handle_root)
    app.router.add_get("/health", handle_health)
    app.router.add_post("/generate", handle_generate)
    app.router.add_get("/stats", handle_stats)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/v1/models", handle_models)
    app.router.add_post(openai_api.COMPLETIONS, handle_openai_completion)
    app.router.add_post(openai_api.CHAT, handle_openai_completion)
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app


async def _on_startup(app: web.Application) -> None:
    state = app[STATE]
    await state.scheduler.start()
    state.start_loading()


async def _on_cleanup(app: web.Application) -> None:
    state = app[STATE]
    await state.scheduler.close()
    state.check_executor.shutdown(wait=False, cancel_futures=True)
    state.info_executor.shutdown(wait=False, cancel_futures=True)


# --- handlers -----------------------------------------------------------------------------------

async def handle_root(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "model_loaded": request.app[STATE].model_loaded})


async def handle_health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    backend = state.require_ready()
    info = await state.device_info()
    return web.json_response({
        "status": "healthy",
        "model_loaded": True,
        "model": backend.name,
        "synthetic": backend.synthetic,
        "device": _device_type(backend),
        "gpu_name": backend.gpu_name,
        "gpu_count": info["gpu_count"],
        "gpu_memory": info["memory"],
        "load_time_s": round(backend.load_time_s, 3),
        "context_length": backend.context_length,
        "max_tokens_limit": state.max_tokens_limit,
        "mode": state.scheduler.mode,
        "uptime_s": round(state.scheduler.stats()["uptime_s"], 3),
    })


async def handle_generate(request: web.Request) -> web.Response:
    received = time.perf_counter()
    state = request.app[STATE]
    backend = state.require_ready()
    generate_api.check_content_type(request.content_type)
    body = await request.read()  # over 1 MiB raises 413 (client_max_size)
    params = generate_api.parse_generate_body(body, state.max_tokens_limit)
    await _tokenize(state, backend, params)
    request_id = uuid.uuid4().hex[:16]
    result = await state.scheduler.submit(params)  # errors reach the middleware's mapping
    total_ms = (time.perf_counter() - received) * 1000
    state.metrics.observe(result, total_ms)
    log.info("POST /generate 200 %s: %d prompt + %d generated tokens, queue %.0f ms, "
             "inference %.0f ms", request_id, result.prompt_tokens, result.tokens_generated,
             result.queue_time_ms, result.inference_time_ms)
    return web.json_response({
        "generated_text": result.generated_text,
        "prompt": result.prompt,
        "tokens_generated": result.tokens_generated,
        "inference_time_ms": result.inference_time_ms,
        "gpu_name": backend.gpu_name,
        "gpu_memory_used_gb": result.memory_used_gb,
        "queue_time_ms": round(result.queue_time_ms, 2),
        "time_to_first_token_ms": result.time_to_first_token_ms,
        "time_per_output_token_ms": result.time_per_output_token_ms,
        "total_time_ms": round(total_ms, 2),
        "tokens_per_second": result.tokens_per_second,
        "model": backend.name,
        "request_id": request_id,
        "device": _device_type(backend),
        "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason,
        "synthetic": backend.synthetic,
    }, headers={"X-Request-ID": request_id})


async def handle_models(request: web.Request) -> web.Response:
    return web.json_response(openai_api.models_list(request.app[STATE].require_ready()))


async def handle_openai_completion(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions and /v1/chat/completions, streamed or not: parsed and checked by
    `openai_api`, then the same queue, limits and metrics as /generate."""
    received = time.perf_counter()
    state = request.app[STATE]
    backend = state.require_ready()
    openai_api.check_content_type(request.content_type)
    body = await request.read()  # over 1 MiB raises 413 (client_max_size)
    call = openai_api.parse(request.path, body, openai_api.model_id(backend))
    params = await _off_loop_if_long(state, len(body), call.prepare, backend,
                                     state.max_tokens_limit)

    def observe(result) -> None:
        total_ms = (time.perf_counter() - received) * 1000
        state.metrics.observe(result, total_ms)
        log.info("POST %s 200 %s%s: %d prompt + %d generated tokens, queue %.0f ms, inference "
                 "%.0f ms", request.path, call.id, " (stream)" if call.stream else "",
                 result.prompt_tokens, result.tokens_generated, result.queue_time_ms,
                 result.inference_time_ms)

    if call.stream:
        return await openai_api.stream(request, call, params, backend, state.scheduler.submit,
                                       observe)
    return await openai_api.complete(call, params, backend, state.scheduler.submit, observe)


async def handle_metrics(request: web.Request) -> web.Response:
    """Prometheus text format (`labkit.serve.metrics`); answers while the model loads too."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def handle_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    info = await state.device_info()
    memory = info["memory"]
    server = state.counters()
    server["shutting_down"] = state.shutdown_reason is not None
    backend = state.backend
    server["cuda_graphs"] = backend.cuda_graphs if backend else False
    return web.json_response({
        "gpu_name": backend.gpu_name if backend else info["gpu_name"],
        "gpu_count": info["gpu_count"],
        "driver_version": info["driver_version"],
        "cuda_version": info["cuda_version"],
        "pytorch_version": info["pytorch_version"],
        "device": _device_type(backend) if backend else info["device"],
        "memory": memory,
        "model": backend.name if backend else None,
        "model_loaded": backend is not None,
        "server": server,
    })


async def _tokenize(state: ServerState, backend: Backend, params: Request) -> None:
    """Tokenize the prompt once; PromptTooLong surfaces here as a 413, before the request takes
    a place in the queue."""
    await _off_loop_if_long(state, len(params.prompt), backend.tokenize, params)


async def _off_loop_if_long(state: ServerState, size: int, fn: Callable, *args):
    """fn(*args), which tokenizes `size` characters (or bytes) of text: right here when they
    are few, else on the check thread, so that a 1 MiB prompt does not stall the event loop.
    A short prompt tokenizes in ~30 µs, while a hop to another thread waits for the GIL, which
    a busy event loop lets go only every 5 ms (sys.getswitchinterval): with 256 clients on an
    H200, every prompt went through the hop and each waited 28 ms there on average
    (benchmarks/RESULTS.md, "Continuous batching engine")."""
    if size <= INLINE_TEXT_CHARS:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(state.check_executor, fn, *args)


def _describe_mode(server: dict) -> str:
    if server["mode"] == "continuous":
        return (f"continuous: up to {server['max_batch_size']} requests at once, KV cache of "
                f"{server['kv_pages_total']} pages of {server['kv_page_tokens']} tokens")
    if server["mode"] != "batched":
        return server["mode"]
    return (f"batched: up to {server['max_batch_size']} requests a batch, waiting up to "
            f"{server['max_wait_ms']:g} ms for one to fill")


def _device_type(backend: Backend) -> str:
    return backend.device.split(":")[0]


@web.middleware
async def _errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves as `{"error": "..."}`: ours (ApiError), aiohttp's (404, 405, 413),
    and unexpected exceptions (500, logged with the traceback: a 500 is always a bug). On a /v1
    path, in OpenAI's shape instead, with the field at fault (`param`) where there is one."""
    headers: dict[str, str] = {}
    param = code = None
    try:
        return await handler(request)
    except ApiError as err:
        status, message = err.status, err.message
        param, code = getattr(err, "param", None), getattr(err, "code", None)
    except PromptTooLong as err:
        status, message = 413, str(err)
    except InvalidRequest as err:
        status, message = 400, str(err)
    except EngineGone as err:
        status, message = 503, str(err)
    except OutOfMemory as err:
        status = 503
        message = (f"Out of memory while generating ({err}). The server freed its cache and "
                   "keeps serving: retry, or lower max_tokens / shorten the prompt.")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status, message = exc.status, _http_error_message(exc, request)
        if "Allow" in exc.headers:
            headers["Allow"] = exc.headers["Allow"]
    except Exception as exc:
        log.exception("Internal error on %s %s", request.method, request.path)
        status = 500
        message = (f"Internal server error (a bug in labkit; the log has the traceback): "
                   f"{type(exc).__name__}: {exc}")
    if request.path in GENERATION_PATHS and 400 <= status < 500:
        request.app[STATE].rejected += 1
    if openai_api.is_openai_path(request.path):
        return web.json_response(openai_api.error_body(status, message, param, code),
                                 status=status, headers=headers)
    return web.json_response({"error": message}, status=status, headers=headers)


GENERATION_PATHS = ("/generate", openai_api.COMPLETIONS, openai_api.CHAT)


def _http_error_message(exc: web.HTTPException, request: web.Request) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return (f"No endpoint at {request.path}. Endpoints: {generate_api.ENDPOINTS}; "
                f"OpenAI-compatible: {openai_api.ENDPOINTS}.")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        hint = f" with a JSON body: {generate_api.EXAMPLE}" if request.path == "/generate" else ""
        return f"{request.method} is not allowed on {request.path}; use {allowed}{hint}."
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return (f"Request body is larger than the 1 MiB limit ({generate_api.MAX_BODY_BYTES} "
                "bytes). Send a shorter prompt.")
    return f"{exc.status} {exc.reason}"


# --- running it ---------------------------------------------------------------------------------

async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 8000, *,
                watch_parent: bool = False, drain_timeout_s: float = 600.0) -> int:
    """Listen, load, serve until a signal (or the parent's exit), drain, stop. Returns the exit
    status: 0 after a graceful stop, 1 when the model failed to load."""
    state = app[STATE]
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=10.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    url = f"http://{host}:{bound_port}"
    log.info("%s%s (model loading: /health answers 503 until it is ready)",
             LISTENING_PREFIX, url)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(reason: str) -> None:
        if state.shutdown_reason is not None:  # second signal: no more waiting
            log.warning("%s again: stopping now, abandoning queued requests", reason)
            logging.shutdown()
            os._exit(1)
        state.shutdown_reason = reason
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    if watch_parent:
        _watch_parent(loop, request_stop)

    async def announce_ready() -> None:
        await state.finished_loading.wait()
        if state.load_error is not None:
            stop.set()
        else:
            log.info("Ready: POST %s/generate (mode %s, max_tokens up to %d)", url,
                     _describe_mode(state.scheduler.stats()), state.max_tokens_limit)

    watcher = asyncio.create_task(announce_ready())
    await stop.wait()
    watcher.cancel()
    if state.load_error is None:
        stats = state.scheduler.stats()
        log.info("Shutting down (%s): finishing %d queued + %d running request(s); new "
                 "requests get 503", state.shutdown_reason, stats["queue_depth"],
                 stats["in_flight"])
        if not await state.scheduler.wait_idle(drain_timeout_s):
            log.warning("Gave up waiting for requests after %.0f s", drain_timeout_s)
    await runner.cleanup()
    log.info("Server stopped after serving %d request(s)", state.scheduler.served)
    return 1 if state.load_error is not None else 0


def _watch_parent(loop: asyncio.AbstractEventLoop, request_stop) -> None:
    """Stop when the process that launched us dies (the notebook kernel, a test): the launcher
    holds our stdin pipe, which reads EOF once it is gone, even after a SIGKILL. The parent pid
    check covers a pipe that something else kept open."""
    parent = os.getppid()

    def on_parent_gone(how: str) -> None:
        loop.call_soon_threadsafe(request_stop, f"parent process {parent} {how}")

    def read_stdin() -> None:
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader's lock makes
        # the interpreter abort at exit ("could not acquire lock ... at interpreter shutdown").
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        on_parent_gone("closed our stdin")

    def poll_ppid() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        on_parent_gone("exited")

    threading.Thread(target=read_stdin, name="labkit-parent-pipe", daemon=True).start()
    threading.Thread(target=poll_ppid, name="labkit-parent-pid", daemon=True).start()


def configure_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="model",
                        help="model source: model (default, the embedded model), a local "
                             "directory, a cached Hub id, or synthetic:<shape>")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default loopback; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--max-tokens-limit", type=int, default=1024,
                        help="largest max_tokens a request may ask for (default 1024)")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    parser.add_argument("--mode", default="sequential", choices=sorted(SCHEDULERS),
                        help="serving mode: sequential = one generation at a time (the seed); "
                             "batched = requests waiting for the model are generated together; "
                             "continuous = requests join and leave the batch at every step")
    parser.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                        help="batched mode: most requests in one batch (default "
                             f"{DEFAULT_MAX_BATCH_SIZE}); continuous mode: most requests "
                             f"decoding at once (default {DEFAULT_MAX_RUNNING})")
    parser.add_argument("--max-wait-ms", type=float, default=None, metavar="MS",
                        help="batched mode: how long a batch waits to fill after its first "
                             f"request arrives (default {DEFAULT_MAX_WAIT_MS:g})")
    parser.add_argument("--kv-cache-gb", type=float, default=None, metavar="GB",
                        help="continuous mode: GPU memory for the paged KV cache (default a "
                             "tenth of the card; 0.25 on the CPU); bounds how many tokens "
                             "all running requests hold together")
    parser.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                        help="continuous mode: most prompt tokens prefilled per step (default "
                             "2048); a longer prompt is prefilled over several steps")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="continuous mode: run the engine in a process of its own (default "
                             "on); --no-engine-process runs it on a thread of the server, "
                             "sharing the event loop's GIL")
    parser.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="batched mode on a GPU: replay each decode step from a CUDA graph "
                             "(default on; --no-cuda-graphs decodes eagerly, the GPU waiting "
                             "on Python between kernels)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for generation (default on the CPU: one less than "
                             "the cores, leaving one to the server and clients)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="throwaway generations after loading, before serving (default 1)")
    parser.add_argument("--drain-timeout", type=float, default=600.0,
                        help="on SIGTERM, seconds to wait for accepted requests (default 600)")
    parser.add_argument("--watch-parent", action="store_true",
                        help="stop when the launching process exits or closes our stdin "
                             "(used by labkit.serve.launcher.launch)")


def run_cli(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr, force=True)
    if args.max_tokens_limit < 1:
        print("error: --max-tokens-limit must be at least 1", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("error: --threads must be at least 1", file=sys.stderr)
        return 2
    try:
        scheduler_options = _scheduler_options(args)
        engine_options = _engine_options(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    def load() -> Backend:
        options = dict(device=args.device, dtype=args.dtype, warmup_runs=args.warmup,
                       threads=args.threads,
                       max_batch_size=scheduler_options.get("max_batch_size"),
                       cuda_graphs=args.cuda_graphs is not False, continuous=engine_options)
        if engine_options is not None and args.engine_process is not False:
            from labkit.serve.engine_process import EngineProcessBackend

            return EngineProcessBackend.start(args.model, **options)
        from labkit.serve.backend import load_model_backend  # torch: on the loading thread

        return load_model_backend(args.model, **options)

    async def main() -> int:
        app = create_app(load, max_tokens_limit=args.max_tokens_limit, mode=args.mode,
                         **scheduler_options)
        return await serve(app, args.host, args.port, watch_parent=args.watch_parent,
                           drain_timeout_s=args.drain_timeout)

    try:
        return asyncio.run(main())
    except OSError as err:  # address in use, permission denied
        log.error("Could not listen on %s:%s: %s. Pick another --port (0 = any free one).",
                  args.host, args.port, err)
        return 1


# Which flags each mode takes; the others are an error in that mode.
MODE_FLAGS = {
    "sequential": (),
    "batched": ("--max-batch-size", "--max-wait-ms", "--cuda-graphs"),
    "continuous": ("--max-batch-size", "--kv-cache-gb", "--prefill-chunk", "--cuda-graphs",
                   "--engine-process"),
}


def _scheduler_options(args) -> dict:
    """The scheduler's options of the chosen mode (batched: --max-batch-size, --max-wait-ms;
    continuous: --max-batch-size); an error for a flag the mode does not take."""
    given = {"--max-batch-size": args.max_batch_size, "--max-wait-ms": args.max_wait_ms,
             "--kv-cache-gb": getattr(args, "kv_cache_gb", None),
             "--prefill-chunk": getattr(args, "prefill_chunk", None),
             "--cuda-graphs": args.cuda_graphs,
             "--engine-process": getattr(args, "engine_process", None)}
    wrong = [flag for flag, value in given.items()
             if value is not None and flag not in MODE_FLAGS[args.mode]]
    if wrong:
        negated = {"--cuda-graphs": args.cuda_graphs is False,
                   "--engine-process": getattr(args, "engine_process", None) is False}
        names = [f.replace("--", "--no-", 1) if negated.get(f) else f for f in wrong]
        modes = [mode for mode, flags in MODE_FLAGS.items() if set(wrong) <= set(flags)]
        verb, pronoun = ("apply", "them") if len(wrong) > 1 else ("applies", "it")
        where = " or ".join(f"--mode {mode}" for mode in modes) or "another mode"
        raise ValueError(f"{' and '.join(names)} {verb} only to {where}; add "
                         f"{'it' if len(modes) == 1 else 'one'} or drop {pronoun}")
    if args.mode == "sequential":
        return {}
    default_batch = DEFAULT_MAX_BATCH_SIZE if args.mode == "batched" else DEFAULT_MAX_RUNNING
    checks = {"--max-batch-size": (default_batch, check_max_batch_size)}
    if args.mode == "batched":
        checks["--max-wait-ms"] = (DEFAULT_MAX_WAIT_MS, check_max_wait_ms)
    options = {}
    for flag, (default, check) in checks.items():
        value = default if given[flag] is None else given[flag]
        try:
            check(value)
        except ValueError as err:
            raise ValueError(f"{flag}: {err}") from None
        options[flag.removeprefix("--").replace("-", "_")] = value
    return options


def _engine_options(args) -> dict | None:
    """Continuous mode's engine options (KV cache memory, prefill chunk), checked; else None."""
    if args.mode != "continuous":
        return None
    options = {}
    if args.kv_cache_gb is not None:
        if not 0 < args.kv_cache_gb <= 10_000:
            raise ValueError(f"--kv-cache-gb must be a positive number of gigabytes, got "
                             f"{args.kv_cache_gb:g}")
        options["kv_cache_gb"] = args.kv_cache_gb
    if args.prefill_chunk is not None:
        if args.prefill_chunk < 1:
            raise ValueError(f"--prefill-chunk must be at least 1 token, got "
                             f"{args.prefill_chunk}")
        options["prefill_chunk"] = args.prefill_chunk
    return options
