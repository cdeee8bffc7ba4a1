"""What the server asks of a model: tokenize a request, generate it (alone or in a batch),
free memory after an out-of-memory error.

The HTTP layer and the schedulers only see the `Backend` interface, so tests can serve a stub
(an injected delay, a fake out-of-memory error) through the very same server code. `generate`
serves the sequential mode, `generate_batch` the batched one (`labkit.serve.schedulers`). This
module imports torch: the server imports it only when it starts loading the model.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from labkit.engine import hf_generate, synthetic, text
from labkit.engine.batched import generate_batch
from labkit.engine.continuous import DEFAULT_MAX_RUNNING, DEFAULT_PREFILL_CHUNK, ContinuousEngine
from labkit.engine.device import set_cpu_threads
from labkit.engine.model import LoadedModel, load_model, resolve_local_path
from labkit.engine.request import Request, Result
from labkit.engine.static_decode import StaticDecoders
from labkit.measure import gpu

log = logging.getLogger(__name__)


class Backend(Protocol):
    """A loaded model, as the server uses it. `generate` blocks; it runs off the event loop."""

    name: str  # shown in every response ("... (synthetic: ...)" for synthetic models)
    source: str  # what it was loaded from (`--model`): the id OpenAI clients name it by
    synthetic: bool
    device: str  # "cpu" or "cuda"/"cuda:N": where generation runs
    gpu_name: str | None  # the card generation runs on; None on the CPU
    context_length: int
    token_budget: int  # the most tokens (prompt + generated) one request may hold
    load_time_s: float
    cuda_graphs: bool  # batched decode steps replayed from CUDA graphs

    def tokenize(self, request: Request) -> None:
        """Store the prompt's token ids on the request and check, once, that it fits: the
        model's context, and in continuous mode the whole KV cache (PromptTooLong if not); the
        engine takes it without checking again. Runs on the event loop or the server's check
        thread, never the generation thread."""

    def generate(self, request: Request) -> Result:
        """Run one generation."""

    def detokenizer(self):
        """A fresh incremental detokenizer: `push(token_id) -> new text`. Call it on the
        generation thread (inside a request's `on_token`): it uses that thread's tokenizer."""

    def chat_prompt(self, messages: list[dict]) -> str:
        """Chat messages in the model's own format, ending where the assistant's answer begins
        (for a `Request(..., templated=True)`)."""

    def generate_batch(self, requests: list[Request],
                       on_finish: Callable[[int, Result], None] | None = None) -> list[Result]:
        """Run `requests` as one batch; returns their results in order and calls
        on_finish(index, result) as each one finishes."""

    def warm_up(self) -> None:
        """Throwaway work before the first request; the server calls it on the thread that
        will generate, before it reports ready."""

    def free_memory(self) -> None:
        """Release cached device memory (after an out-of-memory error)."""

    def memory_used_gb(self) -> float | None:
        """GPU memory held by tensors now (torch allocated), None on the CPU."""

    def memory_gb(self) -> dict | None:
        """The device memory an engine in a process of its own reports (`gpu.memory_gb`);
        None where this process holds the model (the server reads torch's figures itself)."""


class EngineBackend(Backend, Protocol):
    """A backend the continuous engine serves (continuous mode): the scheduler adds requests to
    `engine` and reads its stats; the engine runs in a process of its own when
    `engine_process`, and then `close` stops that process."""

    engine_process: bool
    engine: Any  # ContinuousEngine here, EngineProcess over the pipe: add, cancel, stats

    def close(self) -> None:
        """Stop what the backend started (the engine process); a no-op otherwise."""


class ModelBackend(text.TextSide):
    """A loaded model served with `hf_generate.generate`, and in batches with
    `batched.generate_batch` (over `static` decoders when given: CUDA graphs)."""

    def __init__(self, lm: LoadedModel, static: StaticDecoders | None = None,
                 warmup_runs: int = 0, max_batch_size: int | None = None):
        super().__init__(lm)
        self.static = static
        self.warmup_runs, self.max_batch_size = warmup_runs, max_batch_size
        self.cuda_graphs = static is not None and static.capture
        self.name, self.source = lm.name, lm.source
        self.synthetic = lm.synthetic
        self.device = str(lm.device)
        self.gpu_name = (torch.cuda.get_device_name(lm.device)
                         if lm.device.type == "cuda" else None)
        self.context_length = self.token_budget = lm.context_length
        self.load_time_s = lm.load_time_s

    def generate(self, request: Request) -> Result:
        return hf_generate.generate(self.lm, request)

    def generate_batch(self, requests: list[Request],
                       on_finish: Callable[[int, Result], None] | None = None) -> list[Result]:
        return generate_batch(self.lm, requests, on_finish, static=self.static)

    def warm_up(self) -> None:
        """Throwaway generations, so the first timed request does not pay one-off costs
        (allocator growth, kernel selection, lazy imports); with CUDA graphs, one short batch
        of each padded batch size, so each graph is captured before the first request. The
        server runs this on its generation thread: after a warm-up on another thread, the first
        request on that thread was 3x slower than the next ones (benchmarks/RESULTS.md, H100,
        "Model loading and one generation")."""
        if not self.warmup_runs:
            return
        began = time.perf_counter()
        hf_generate.warmup(self.lm, runs=self.warmup_runs)
        graphs = ""
        if self.static is not None:
            rows = 1
            while True:  # each padded batch size up to max_batch_size: 1, 2, 4, ...
                self.generate_batch([Request("warm-up", 2, 0) for _ in range(rows)])
                if rows >= self.max_batch_size:
                    break
                rows *= 2
            graphs = f"; CUDA graphs captured for (batch, cache tokens) {self.static.shapes}"
        log.info("Warm-up: %d run(s) of %d tokens%s, in %.1f s", self.warmup_runs,
                 hf_generate.WARMUP_TOKENS, graphs, time.perf_counter() - began)

    def free_memory(self) -> None:
        if self.static is not None:
            self.static.clear()  # made again, smaller, as batches need them
        gc.collect()
        if self.lm.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_used_gb(self) -> float | None:
        if self.lm.device.type != "cuda":
            return None
        return round(torch.cuda.memory_allocated(self.lm.device) / 1e9, 3)

    def memory_gb(self) -> dict | None:
        return None


class ContinuousBackend(ModelBackend):
    """A loaded model served by the continuous-batching engine (`labkit.engine.continuous`),
    which runs its own compact copy of the model over a paged KV cache; every generation,
    single or batched, goes through the engine."""

    engine_process = False  # the engine steps on the server's generation thread

    def __init__(self, lm: LoadedModel, engine: ContinuousEngine, warmup_runs: int = 0):
        super().__init__(lm, None, warmup_runs=warmup_runs,
                         max_batch_size=engine.scheduler.max_running)
        self.engine = engine
        self.cuda_graphs = engine.runner.cuda_graphs
        self.token_budget = min(self.context_length, engine.cache.tokens)

    def tokenize(self, request: Request) -> None:
        super().tokenize(request)
        # 413 before it queues, if the cache is too small; marked as fitting, `add` takes it
        self.engine.check_fits(request)

    def close(self) -> None:
        """Nothing to stop: the engine runs on the server's own generation thread."""

    def generate(self, request: Request) -> Result:
        return self.engine.generate([request])[0]

    def generate_batch(self, requests: list[Request],
                       on_finish: Callable[[int, Result], None] | None = None) -> list[Result]:
        results = self.engine.generate(requests)
        for index, result in enumerate(results):
            if on_finish is not None:
                on_finish(index, result)
        return results

    def warm_up(self) -> None:
        """The engine's CUDA graphs, then throwaway generations (`ContinuousEngine.warm_up`)."""
        if self.warmup_runs:
            self.engine.warm_up(self.warmup_runs, hf_generate.WARMUP_TOKENS)

    def free_memory(self) -> None:
        gc.collect()  # the KV cache and the graphs stay: they are the engine's fixed memory
        if self.lm.device.type == "cuda":
            torch.cuda.empty_cache()


def build_continuous_backend(lm: LoadedModel, kv_cache_gb: float | None = None,
                             max_running: int = DEFAULT_MAX_RUNNING,
                             prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                             cuda_graphs: bool = True, warmup_runs: int = 1,
                             quantization: str | None = None,
                             prefix_cache: bool = True,
                             kv_cache_dtype: str | None = None) -> ContinuousBackend:
    engine = ContinuousEngine.build(lm, kv_cache_gb=kv_cache_gb, max_running=max_running,
                                    prefill_chunk=prefill_chunk, cuda_graphs=cuda_graphs,
                                    quantization=quantization, prefix_cache=prefix_cache,
                                    kv_cache_dtype=kv_cache_dtype)
    return ContinuousBackend(lm, engine, warmup_runs=warmup_runs)


def load_model_backend(source: str = "model", device: str = "auto", dtype: str = "auto",
                       warmup_runs: int = 1, threads: int | None = None,
                       max_batch_size: int | None = None,
                       cuda_graphs: bool = True,
                       continuous: dict | None = None) -> ModelBackend:
    """Load `source` and log it in the seed's words. The warm-up (`warmup_runs` generations;
    with `max_batch_size`, batched mode, on a GPU also the CUDA graphs of batched decoding
    unless `cuda_graphs` is false) is left to `ModelBackend.warm_up`, to run on the thread
    that will generate. With `continuous` (options of `build_continuous_backend`), the model is
    served by the continuous-batching engine."""
    where = source if synthetic.is_synthetic(source) else resolve_local_path(source).resolve()
    log.info("Loading model from %s", where)
    log.info("%s", gpu.describe())
    lm = load_model(source, device=device, dtype=dtype)
    set_cpu_threads(lm.device.type, threads)
    log.info("Model loaded successfully! %s, %s parameters, %s, on %s, in %.1f s",
             lm.name, f"{lm.num_parameters:,}", str(lm.dtype).removeprefix("torch."),
             lm.device, lm.load_time_s)
    if continuous is not None:  # kv_cache_gb, prefill_chunk
        return build_continuous_backend(lm, max_running=max_batch_size or DEFAULT_MAX_RUNNING,
                                        cuda_graphs=cuda_graphs, warmup_runs=warmup_runs,
                                        **continuous)
    graphs = bool(max_batch_size) and cuda_graphs and lm.device.type == "cuda"
    if max_batch_size and lm.device.type == "cuda" and not graphs:
        log.info("Batched decoding runs eagerly (--no-cuda-graphs): the GPU waits on Python "
                 "between kernels")
    return ModelBackend(lm, StaticDecoders(lm) if graphs else None,
                        warmup_runs=warmup_runs, max_batch_size=max_batch_size)

