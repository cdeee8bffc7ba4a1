"""`labkit serve`: the seed's HTTP inference server on aiohttp.

Endpoints (README, "The HTTP API"): GET / (simple health), GET /health (detailed,
503 while the model loads), POST /generate, GET /stats (device + server counters), GET /metrics
(Prometheus), and the OpenAI-compatible GET /v1/models, POST /v1/completions and
POST /v1/chat/completions (streaming too; their contract lives in `labkit.serve.openai_api`).
Errors leave as `{"error": "..."}`, and on a /v1 path in OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`.

The model loads on a background thread, so readiness is observable. Requests go through a
scheduler (`labkit.serve.schedulers`); the default, sequential one runs exactly one generation
at a time on its own thread, so the event loop keeps answering health and stats calls within
milliseconds while the model works. An engine that dies or wedges turns `/` and `/health` to
503 at once. Listening, stopping on signals and the exit status: `labkit.serve.lifecycle`.

Each generation request ends in exactly one outcome: served, failed or cancelled once the
scheduler has it, rejected (or cancelled, or failed) before. `/stats` and `/metrics` count them.
The command line is `labkit.serve.cli`; for notebooks, `labkit.serve.launcher.launch()`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from labkit.engine.request import EngineGone, InvalidRequest, OutOfMemory, PromptTooLong, Request
from labkit.serve import access, generate_api, openai_api, streaming
from labkit.serve.errors import ApiError, internal_error_message, openai_error
from labkit.serve.metrics import CONTENT_TYPE, ServerMetrics
from labkit.serve.schedulers import Scheduler, make_scheduler

if TYPE_CHECKING:
    from labkit.serve.backend import Backend

log = logging.getLogger(__name__)

NOT_LOADED = "Model not loaded"
# Prompts (or /v1 bodies) up to this many characters are tokenized on the event loop, longer
# ones on the check thread (`_off_loop_if_long`).
INLINE_TEXT_CHARS = 4096
SHUTTING_DOWN = ("Server is shutting down: it finishes the requests it already accepted and "
                 "takes no new ones. Retry against a running server.")
# Counted per API server, summed over all of them (labkit.serve.api_servers).
REQUEST_COUNTERS = ("requests_served", "requests_failed", "requests_cancelled",
                    "requests_rejected")
GENERATION_PATHS = ("/generate", openai_api.COMPLETIONS, openai_api.CHAT)
# Keys of a request's own state (typed keys from aiohttp 3.13; plain strings before).
_key = getattr(web, "RequestKey", lambda name, kind: name)
REQUEST_ID = _key("labkit_request_id", str)
SUBMITTED = _key("labkit_submitted", bool)  # the scheduler counts its outcome


class ServerState:
    """Everything the handlers share: model, scheduler, counters, lifecycle flags."""

    def __init__(self, load_backend: Callable[[], Backend], scheduler: Scheduler,
                 max_tokens_limit: int, body_timeout_s: float):
        self.load_backend = load_backend
        self.scheduler = scheduler
        self.max_tokens_limit = max_tokens_limit
        self.body_timeout_s = body_timeout_s
        self.backend: Backend | None = None
        self.load_error: BaseException | None = None
        self.shutdown_reason: str | None = None
        # Generation requests that ended before the scheduler had them: rejected (refused: bad
        # input, loading, shutting down), cancelled (the client left), failed (a bug: 500).
        self.early: collections.Counter[str] = collections.Counter()
        self.loaded = asyncio.Event()
        self.finished_loading = asyncio.Event()  # loaded or failed
        # Long prompts' checks tokenize (up to 1 MiB of text) and device queries may wait for a
        # torch import: both stay off the event loop, on threads of their own.
        self.check_executor = concurrent.futures.ThreadPoolExecutor(1, "labkit-check")
        self.info_executor = concurrent.futures.ThreadPoolExecutor(1, "labkit-info")
        self.metrics = ServerMetrics(self.counters, self._gpu_reading, self._other_servers)
        self._nvml_reader = None
        # With several API servers (labkit.serve.api_servers): which one this is, of how many.
        self.api_server, self.api_servers = 0, 1

    def counters(self) -> dict:
        """The scheduler's counters, with the requests that ended before reaching it; with
        several API servers, the others' requests are added in (the engine's are whole)."""
        stats = self.own_counters()
        for other in self._other_servers():
            for key in REQUEST_COUNTERS:
                stats[key] += other[key]
        return stats

    def own_counters(self) -> dict:
        stats = self.scheduler.stats()
        for outcome in ("failed", "cancelled"):
            stats[f"requests_{outcome}"] += self.early[outcome]
        stats["requests_rejected"] = self.early["rejected"]
        return stats

    def report(self) -> dict:
        """This API server's own counters, for the others (sent through the engine)."""
        own = self.own_counters()
        return {**{key: own[key] for key in REQUEST_COUNTERS}, **self.metrics.report()}

    def _other_servers(self) -> list[dict]:
        """The other API servers' reports, as the engine last passed them on."""
        if self.api_servers == 1:
            return []
        reports = self.backend.engine.reports
        return [report for index, report in reports.items() if index != self.api_server]

    def failure(self) -> str | None:
        """Why this server can no longer generate (its engine died or wedged), or None."""
        return self.scheduler.failure() if self.backend is not None else None

    def _gpu_reading(self) -> dict | None:
        """NVML's columns for the card the model runs on; None without a GPU or a model."""
        if self.backend is None or not self.backend.device.startswith("cuda"):
            return None
        if self._nvml_reader is None:
            from labkit.measure import gpu, readers

            lib = gpu.nvml()
            if lib is None:
                return None
            index = int(self.backend.device.split(":")[1]) if ":" in self.backend.device else 0
            self._nvml_reader = readers.NvmlReader(lib, index)
        return self._nvml_reader.read()

    @property
    def model_loaded(self) -> bool:
        return self.backend is not None

    def require_ready(self) -> Backend:
        if self.shutdown_reason is not None:
            raise ApiError(503, SHUTTING_DOWN)
        if self.backend is None:
            raise ApiError(503, NOT_LOADED)
        failure = self.failure()
        if failure is not None:
            raise ApiError(503, f"The model cannot generate: {failure}", code="engine_failed")
        return self.backend

    async def submit(self, http_request: web.Request, params: Request):
        """Hand `params` to the scheduler, which from here on counts its outcome."""
        http_request[SUBMITTED] = True
        return await self.scheduler.submit(params)

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
        self.api_servers = getattr(backend, "info", {}).get("api_servers", 1)
        if self.api_servers > 1:
            self.api_server = backend.engine.index
            backend.engine.report = self.report
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
        engine_memory = self.backend.memory_gb() if self.backend is not None else None
        loop = asyncio.get_running_loop()
        info = await loop.run_in_executor(self.info_executor, gpu.device_info, index,
                                          engine_memory is None)
        if engine_memory is not None:
            info["memory"] = engine_memory
        return info


STATE = web.AppKey("labkit_state", ServerState)


def create_app(load_backend: Callable[[], Backend], *, max_tokens_limit: int = 1024,
               mode: str = "sequential", api_key: str | None = None,
               allowed_hosts: frozenset[str] | None = None,
               body_timeout_s: float = access.DEFAULT_BODY_TIMEOUT_S,
               **scheduler_options) -> web.Application:
    """The aiohttp application. `load_backend` runs on a background thread at startup; tests
    pass a stub, `labkit serve` passes `load_model_backend` for the chosen model.
    `scheduler_options` go to the mode's scheduler (batched: max_batch_size, max_wait_ms).
    With `api_key`, every endpoint but / and /health wants it; with `allowed_hosts`, requests
    addressed to another Host are refused (`labkit.serve.access`)."""
    app = web.Application(middlewares=[_errors_as_json, access.middleware(api_key, allowed_hosts)],
                          client_max_size=generate_api.MAX_BODY_BYTES)
    state = ServerState(load_backend, make_scheduler(mode, **scheduler_options), max_tokens_limit,
                        body_timeout_s)
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
    """Liveness: 200 while the server works (loading included), 503 once its engine is gone."""
    state = request.app[STATE]
    failure = state.failure()
    if failure is not None:
        return web.json_response({"status": "error", "model_loaded": False, "error": failure},
                                 status=503)
    return web.json_response({"status": "ok", "model_loaded": state.model_loaded})


async def handle_health(request: web.Request) -> web.Response:
    """Readiness: 503 while loading, draining, or with a dead or wedged engine (the cause)."""
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
    body = await access.read_body(request, state.body_timeout_s, generate_api.VALID_FORM)
    params = generate_api.parse_generate_body(body, state.max_tokens_limit)
    await _tokenize(state, backend, params)
    request_id = request[REQUEST_ID]
    result = await state.submit(request, params)  # errors reach the middleware's mapping
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
    body = await access.read_body(request, state.body_timeout_s)  # over 1 MiB: 413
    call = openai_api.parse(request.path, body, openai_api.model_id(backend),
                            state.max_tokens_limit)
    request[REQUEST_ID] = call.id
    params = await _off_loop_if_long(state, len(body), call.prepare, backend)

    def observe(result, first_sent: float | None = None) -> None:
        total_ms = (time.perf_counter() - received) * 1000
        ttft_ms = (first_sent - received) * 1000 if first_sent is not None else None
        state.metrics.observe(result, total_ms, ttft_ms)
        log.info("POST %s 200 %s%s: %d prompt + %d generated tokens, queue %.0f ms, inference "
                 "%.0f ms", request.path, call.id, " (stream)" if call.stream else "",
                 result.prompt_tokens, result.tokens_generated, result.queue_time_ms,
                 result.inference_time_ms)

    def submit(params: Request):
        return state.submit(request, params)

    if call.stream:
        return await streaming.stream(request, call, params, backend, submit, observe,
                                       state.scheduler.relay)
    return await streaming.complete(call, params, backend, submit, observe)


async def handle_metrics(request: web.Request) -> web.Response:
    """Prometheus text format (`labkit.serve.metrics`); answers while the model loads too."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def handle_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    info = await state.device_info()
    memory = info["memory"]
    server = state.counters()
    server["api_servers"] = state.api_servers
    if state.api_servers > 1:
        server["api_server"] = state.api_server + 1  # the one that answered
    server["shutting_down"] = state.shutdown_reason is not None
    server["engine_failure"] = state.failure()
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


def describe_mode(server: dict) -> str:
    if server["mode"] == "continuous":
        return (f"continuous: up to {server['max_batch_size']} requests at once, KV cache of "
                f"{server['kv_pages_total']} pages of {server['kv_page_tokens']} tokens"
                + (" in FP8" if server.get("kv_cache_dtype") == "fp8" else ""))
    if server["mode"] != "batched":
        return server["mode"]
    return (f"batched: up to {server['max_batch_size']} requests a batch, waiting up to "
            f"{server['max_wait_ms']:g} ms for one to fill")


def _device_type(backend: Backend) -> str:
    return backend.device.split(":")[0]


@web.middleware
async def _errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """Every error leaves as `{"error": "..."}`: ours (ApiError), aiohttp's (404, 405, 413),
    and unexpected exceptions (500: "internal error" and the request id; the traceback goes to
    the log only, a 500 is always a bug). On a /v1 path, in OpenAI's shape instead, with the
    field at fault (`param`) where there is one. A generation request's outcome is counted
    here when it ended before reaching the scheduler; every refusal is logged."""
    request.setdefault(REQUEST_ID, uuid.uuid4().hex[:16])
    try:
        return await handler(request)
    except asyncio.CancelledError:  # the client went away
        _count_early(request, "cancelled")
        raise
    except Exception as exc:
        status, message, param, code, headers = _error_of(exc, request)
    _count_early(request, "failed" if status == 500 else "rejected")
    request_id = request[REQUEST_ID]
    headers["X-Request-ID"] = request_id
    log.log(logging.WARNING if status >= 500 else logging.INFO, "%s %s %d %s: %s",
            request.method, request.path, status, request_id, message)
    if openai_api.is_openai_path(request.path):
        return web.json_response(openai_error(status, message, param, code),
                                 status=status, headers=headers)
    return web.json_response({"error": message}, status=status, headers=headers)


def _error_of(exc: Exception, request: web.Request) -> tuple:
    """(status, message, param, code, headers) of the answer to `exc`."""
    param = code = None
    headers: dict[str, str] = {}
    if isinstance(exc, ApiError):
        return exc.status, exc.message, exc.param, exc.code, dict(exc.headers)
    if isinstance(exc, PromptTooLong):  # from the check at the door, or the engine's own
        param = "messages" if request.path == openai_api.CHAT else "prompt"
        return 413, str(exc), param, "context_length_exceeded", headers
    if isinstance(exc, InvalidRequest):
        return 400, str(exc), param, code, headers
    if isinstance(exc, EngineGone):
        return 503, str(exc), param, "engine_failed", headers
    if isinstance(exc, OutOfMemory):
        return 503, (f"Out of memory while generating ({exc}). The server freed its cache and "
                     "keeps serving: retry, or lower max_tokens / shorten the prompt."), \
            param, code, headers
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        if "Allow" in exc.headers:
            headers["Allow"] = exc.headers["Allow"]
        return exc.status, _http_error_message(exc, request), param, code, headers
    if isinstance(exc, web.HTTPException):
        raise exc  # a redirect or another non-error answer: aiohttp sends it
    log.error("Internal error on %s %s (request %s)", request.method, request.path,
              request[REQUEST_ID], exc_info=exc)
    return 500, internal_error_message(request[REQUEST_ID]), param, code, headers


def _count_early(request: web.Request, outcome: str) -> None:
    if request.path in GENERATION_PATHS and not request.get(SUBMITTED):
        request.app[STATE].early[outcome] += 1


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
