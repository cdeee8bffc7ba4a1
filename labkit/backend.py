"""What the server asks of a model: check a prompt, generate one completion, free memory.

The HTTP layer and the scheduler only see this small interface, so tests can serve a stub
(an injected delay, a fake out-of-memory error) through the very same server code. `generate`
serves the sequential mode, `generate_batch` the batched one (`labkit.serving`).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("labkit.server")


@dataclass(frozen=True)
class GenerationRequest:
    """One validated /generate request (see labkit.api for the JSON it comes from)."""

    prompt: str
    max_tokens: int = 150
    temperature: float = 0.7
    top_p: float | None = None
    seed: int | None = None


class Backend(Protocol):
    """A loaded model, as the server uses it. `generate` blocks; it runs off the event loop."""

    name: str  # shown in every response ("... (synthetic: ...)" for synthetic models)
    synthetic: bool
    device: str  # "cpu" or "cuda"/"cuda:N": where generation runs
    gpu_name: str | None  # the card generation runs on; None on the CPU
    context_length: int
    load_time_s: float

    def check_prompt(self, prompt: str, max_tokens: int) -> int:
        """Prompt tokens; raises engine.PromptTooLongError when it cannot fit the context."""

    def generate(self, request: GenerationRequest):
        """Run one generation; returns an engine.GenerationResult."""

    def generate_batch(self, requests: list[GenerationRequest],
                       on_finish: Callable[[int, object], None] | None = None) -> list:
        """Run `requests` as one batch; returns their engine.GenerationResults in order and
        calls on_finish(index, result) as each one finishes."""

    def free_memory(self) -> None:
        """Release cached device memory (after an out-of-memory error)."""

    def memory_used_gb(self) -> float | None:
        """GPU memory held by tensors now (torch allocated), None on the CPU."""


class ModelBackend:
    """A `labkit.model.LoadedModel` served with `labkit.engine.generate`."""

    def __init__(self, lm):
        import torch

        self.lm = lm
        self.name = lm.name
        self.synthetic = lm.synthetic
        self.device = str(lm.device)
        self.gpu_name = (torch.cuda.get_device_name(lm.device)
                         if lm.device.type == "cuda" else None)
        self.context_length = lm.context_length
        self.load_time_s = lm.load_time_s
        # Prompt checks run on another thread than generation. A fast tokenizer is a Rust object
        # that raises "Already borrowed" when two threads use it at once, so the checker gets
        # its own copy instead of sharing the generation thread's.
        self._checker = dataclasses.replace(lm, tokenizer=copy.deepcopy(lm.tokenizer))

    def check_prompt(self, prompt: str, max_tokens: int) -> int:
        from labkit import engine

        return int(engine.encode_prompt(self._checker, prompt, max_tokens).shape[1])

    def generate(self, request: GenerationRequest):
        from labkit import engine

        return engine.generate(self.lm, request.prompt, max_tokens=request.max_tokens,
                               temperature=request.temperature, top_p=request.top_p,
                               seed=request.seed)

    def generate_batch(self, requests: list[GenerationRequest],
                       on_finish: Callable[[int, object], None] | None = None) -> list:
        from labkit.batching import generate_batch

        return generate_batch(self.lm, requests, on_finish)

    def free_memory(self) -> None:
        import torch

        gc.collect()
        if self.lm.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_used_gb(self) -> float | None:
        import torch

        if self.lm.device.type != "cuda":
            return None
        return round(torch.cuda.memory_allocated(self.lm.device) / 1e9, 3)


def load_model_backend(source: str = "model", device: str = "auto", dtype: str = "auto",
                       warmup_runs: int = 1, threads: int | None = None) -> ModelBackend:
    """Load `source`, log it in the seed's words, and warm it up so the first timed request
    does not pay for one-off costs (allocator growth, kernel selection, lazy imports)."""
    from labkit import engine, gpu, synthetic
    from labkit.model import load_model, resolve_local_path

    where = source if synthetic.is_synthetic(source) else resolve_local_path(source).resolve()
    log.info("Loading model from %s", where)
    log.info("%s", gpu.describe())
    lm = load_model(source, device=device, dtype=dtype)
    set_cpu_threads(lm.device.type, threads)
    if warmup_runs:
        engine.warmup(lm, runs=warmup_runs)
    log.info("Model loaded successfully! %s, %s parameters, %s, on %s, in %.1f s%s",
             lm.name, f"{lm.num_parameters:,}", str(lm.dtype).removeprefix("torch."),
             lm.device, lm.load_time_s, f" (+ {warmup_runs} warm-up run)" if warmup_runs else "")
    return ModelBackend(lm)


def set_cpu_threads(device_type: str, threads: int | None) -> None:
    """CPU generation: leave one core to the event loop and to a load tester on the same
    machine. torch's default (one thread per core) spin-waits against them: measured on a
    2-core machine with other work running, 2 threads gave 100-160 ms per token where 1 thread
    gave 11-14 ms. An explicit `threads` always wins; on a GPU the default is left alone."""
    import torch

    if threads is None and device_type != "cpu":
        return
    available = torch.get_num_threads()
    chosen = threads or max(1, available - 1)
    torch.set_num_threads(chosen)
    log.info("CPU threads for generation: %d (of %d; --threads to change)", chosen, available)
