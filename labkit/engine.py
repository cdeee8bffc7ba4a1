"""Timed generation with Hugging Face `generate`, one request at a time.

Timing is read on the host after the GPU has finished: `generate` hands every new token to the
streamer as a CPU tensor, which waits for the GPU, so the first hand-off after the prompt marks
prefill + first token (TTFT) and the last marks the end of decoding.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from transformers.generation.streamers import BaseStreamer

from labkit.model import LoadedModel

TEMPERATURE_RANGE = (0.0, 2.0)


class PromptTooLongError(ValueError):
    """Prompt plus max_tokens does not fit in the model's context window."""


@dataclass
class GenerationResult:
    generated_text: str
    prompt: str
    tokens_generated: int
    prompt_tokens: int
    time_to_first_token_ms: float
    inference_time_ms: float
    tokens_per_second: float
    time_per_output_token_ms: float | None
    device: str
    model: str
    synthetic: bool
    finish_reason: str  # "length" (hit max_tokens) or "stop" (EOS)

    def as_dict(self) -> dict:
        return asdict(self)


def validate_prompt(prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty string")


def validate_generation_args(max_tokens, temperature, top_p, max_tokens_limit: int | None = None):
    """Raise ValueError naming the argument and its valid range."""
    limit = max_tokens_limit or 1_000_000
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ValueError(f"max_tokens must be an integer from 1 to {limit}, got {max_tokens!r}")
    if not 1 <= max_tokens <= limit:
        raise ValueError(f"max_tokens must be from 1 to {limit}, got {max_tokens}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number from 0 to 2, got {temperature!r}")
    low, high = TEMPERATURE_RANGE
    if not math.isfinite(temperature) or not low <= temperature <= high:
        raise ValueError(f"temperature must be from 0 to 2 (0 = greedy), got {temperature}")
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
            raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
        if not math.isfinite(top_p) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def format_prompt(lm: LoadedModel, prompt: str) -> str:
    """Wrap the prompt in the tokenizer's chat template when it has one (instruct models)."""
    if lm.synthetic or not getattr(lm.tokenizer, "chat_template", None):
        return prompt
    return lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def encode_prompt(lm: LoadedModel, prompt: str, max_tokens: int) -> torch.Tensor:
    """Token ids of the formatted prompt; raises PromptTooLongError if it cannot fit."""
    ids = lm.tokenizer(format_prompt(lm, prompt), return_tensors="pt",
                       add_special_tokens=False).input_ids
    if ids.shape[1] + max_tokens > lm.context_length:
        raise PromptTooLongError(
            f"prompt is {ids.shape[1]} tokens; with max_tokens={max_tokens} that exceeds the "
            f"model's context of {lm.context_length} tokens. Shorten the prompt or lower "
            "max_tokens."
        )
    return ids


class _TokenClock(BaseStreamer):
    """Records the host time at which each new token reaches the CPU."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def generate(lm: LoadedModel, prompt: str, max_tokens: int = 150, temperature: float = 0.7,
             top_p: float | None = None, seed: int | None = None) -> GenerationResult:
    """Generate one completion and time it. temperature=0 is greedy."""
    validate_prompt(prompt)
    validate_generation_args(max_tokens, temperature, top_p)
    input_ids = encode_prompt(lm, prompt, max_tokens).to(lm.device)
    if seed is not None:
        torch.manual_seed(seed)
    clock = _TokenClock()
    synchronize(lm.device)
    started = time.perf_counter()
    with torch.inference_mode():
        output = lm.model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids),
            streamer=clock, pad_token_id=lm.tokenizer.pad_token_id,
            **sampling_kwargs(lm, max_tokens, temperature, top_p),
        )
    synchronize(lm.device)
    finished = time.perf_counter()
    new_ids = output[0, input_ids.shape[1]:].tolist()
    first = clock.times[0] if clock.times else finished
    return build_result(lm, prompt, input_ids.shape[1], new_ids, started, first, finished)


def sampling_kwargs(lm: LoadedModel, max_tokens: int, temperature: float,
                    top_p: float | None) -> dict:
    kwargs: dict = {"max_new_tokens": max_tokens}
    if lm.synthetic:
        kwargs["min_new_tokens"] = max_tokens  # synthetic: never stop early, timings compare
    if temperature == 0:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:
        kwargs.update(do_sample=True, temperature=float(temperature),
                      top_p=float(top_p) if top_p is not None else 1.0, top_k=0)
    return kwargs


def decode(lm: LoadedModel, ids: list[int]) -> str:
    """Text of generated ids. Synthetic models draw ids from their own (larger) vocabulary,
    so they are folded into the tokenizer's range: the text is meaningless either way."""
    eos = lm.tokenizer.eos_token_id
    if lm.synthetic:
        ids = [i % len(lm.tokenizer) for i in ids]
    else:
        ids = [i for i in ids if i != eos]
    return lm.tokenizer.decode(ids, skip_special_tokens=True).strip()


WARMUP_TOKENS = 150


def warmup(lm: LoadedModel, runs: int = 1, max_tokens: int = WARMUP_TOKENS) -> None:
    """Run throwaway generations so CUDA context, kernels and allocator are ready before timing.
    The KV cache grows by one token per step and each new length can meet new kernels, so warm
    up over as many tokens as will be timed (on an H100 a first 150-token request ran 2.8x
    slower than the next after an 8-token warm-up)."""
    for _ in range(runs):
        generate(lm, "Warm-up", max_tokens=max_tokens, temperature=0)


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """Ids that end a generation: those of the model's generation config, as `generate` uses
    them (one id or a list). Synthetic models have none: they never stop early."""
    configured = None if lm.synthetic else lm.model.generation_config.eos_token_id
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return {i for i in ids if i is not None}


def build_result(lm: LoadedModel, prompt: str, prompt_tokens: int, new_ids: list[int],
                 started: float, first_token_at: float, finished: float) -> GenerationResult:
    """Result of one request from its new ids (a final stop token is not counted) and host
    times (perf_counter): start, first token on the CPU, last token on the CPU."""
    stopped = bool(new_ids) and new_ids[-1] in stop_token_ids(lm)
    n = len(new_ids) - (1 if stopped else 0)
    total_ms = (finished - started) * 1000
    ttft_ms = (first_token_at - started) * 1000
    tpot = (total_ms - ttft_ms) / (n - 1) if n > 1 else None
    return GenerationResult(
        generated_text=decode(lm, new_ids), prompt=prompt, tokens_generated=n,
        prompt_tokens=prompt_tokens, time_to_first_token_ms=round(ttft_ms, 2),
        inference_time_ms=round(total_ms, 2),
        tokens_per_second=round(n / (total_ms / 1000), 2) if total_ms > 0 else 0.0,
        time_per_output_token_ms=round(tpot, 3) if tpot is not None else None,
        device=lm.device.type, model=lm.name, synthetic=lm.synthetic,
        finish_reason="stop" if stopped else "length",
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a host clock read next measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
