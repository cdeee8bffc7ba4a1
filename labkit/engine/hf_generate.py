"""The seed's baseline: Hugging Face `generate`, one request at a time, timed.

Timing is read on the host after the GPU has finished: `generate` hands every new token to the
streamer as a CPU tensor, which waits for the GPU, so the first hand-off after the prompt marks
prefill + first token (TTFT) and the last marks the end of decoding.
"""

from __future__ import annotations

import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from labkit.engine import text
from labkit.engine.model import LoadedModel, synchronize
from labkit.engine.request import Request, Result


class _TokenClock(BaseStreamer):
    """Records the host time at which each new token reaches the CPU, and hands the token to
    the request's `on_token` (a server streams it from there)."""

    def __init__(self, request: Request):
        self.request = request
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        for token_id in value.reshape(-1).tolist():
            self.request.emit(token_id)

    def end(self):
        pass


def generate(lm: LoadedModel, request: Request | str, **sampling) -> Result:
    """Generate one completion with `generate` and time it: a Request, or a prompt and the
    Request's keyword arguments (max_tokens=150, temperature=0.7, top_p, seed)."""
    if not isinstance(request, Request):
        request = Request(request, **sampling)  # checks the arguments
    input_ids = torch.tensor([text.tokenize(lm, request)], device=lm.device)
    if request.seed is not None:
        torch.manual_seed(request.seed)
    clock = _TokenClock(request)
    synchronize(lm.device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = lm.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids),
            streamer=clock, pad_token_id=lm.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_UntilCancelled(request)]),
            **sampling_kwargs(lm, request),
        )
    synchronize(lm.device)
    finished = time.perf_counter()
    new_ids = output[0, input_ids.shape[1]:].tolist()
    first = clock.times[0] if clock.times else finished
    return text.build_result(lm, request, new_ids, started, first, finished)


class _UntilCancelled(StoppingCriteria):
    """Ends `generate` at the next step once the request is cancelled (its client left)."""

    def __init__(self, request: Request):
        self.request = request

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = self.request.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def sampling_kwargs(lm: LoadedModel, request: Request) -> dict:
    """The request's sampling parameters in `generate`'s words."""
    kwargs: dict = {"max_new_tokens": request.max_tokens}
    if lm.synthetic or request.ignore_eos:  # synthetic: never stop early, so timings compare
        kwargs["min_new_tokens"] = request.max_tokens
    elif request.min_tokens:
        kwargs["min_new_tokens"] = request.min_tokens
    if request.greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=request.temperature,
                      top_p=request.top_p or 1.0, top_k=0)
    return kwargs


WARMUP_TOKENS = 150


def warmup(lm: LoadedModel, runs: int = 1, max_tokens: int = WARMUP_TOKENS) -> None:
    """Run throwaway generations so CUDA context, kernels and allocator are ready before timing.
    The KV cache grows by one token per step and each new length can meet new kernels, so warm
    up over as many tokens as will be timed (after an 8-token warm-up, a first 150-token
    request ran 2.8-5x slower than the next on an H100: benchmarks/RESULTS.md)."""
    for _ in range(runs):
        generate(lm, "Warm-up", max_tokens=max_tokens, temperature=0)
