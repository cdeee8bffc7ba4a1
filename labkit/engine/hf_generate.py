"""The seed's baseline: Hugging Face `generate`, one request at a time, timed.

Timing is read on the host after the GPU has finished: `generate` hands every new token to the
streamer as a CPU tensor, which waits for the GPU, so the first hand-off after the prompt marks
prefill + first token (TTFT) and the last marks the end of decoding.
"""

from __future__ import annotations

import time

import torch
from tokenizers.decoders import DecodeStream
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from labkit.engine.model import LoadedModel, synchronize
from labkit.engine.request import PromptTooLong, Request, Result


def format_prompt(lm: LoadedModel, prompt: str) -> str:
    """Wrap the prompt in the tokenizer's chat template when it has one (instruct models)."""
    if lm.synthetic or not getattr(lm.tokenizer, "chat_template", None):
        return prompt
    return lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


def chat_prompt(lm: LoadedModel, messages: list[dict]) -> str:
    """Chat messages in the model's chat template, ending where the assistant's answer begins.
    A model without one (synthetic shapes) gets "role: content" lines."""
    if lm.synthetic or not getattr(lm.tokenizer, "chat_template", None):
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join(lines + ["assistant:"])
    return lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize(lm: LoadedModel, request: Request) -> list[int]:
    """The request's prompt ids (formatted as the model was trained to see it), stored on the
    request the first time; raises PromptTooLong when prompt + max_tokens cannot fit the
    context."""
    if request.prompt_ids is None:
        text = request.prompt if request.templated else format_prompt(lm, request.prompt)
        ids = lm.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) + request.max_tokens > lm.context_length:
            raise PromptTooLong(
                f"prompt is {len(ids)} tokens; with max_tokens={request.max_tokens} that exceeds "
                f"the model's context of {lm.context_length} tokens. Shorten the prompt or lower "
                "max_tokens.")
        request.prompt_ids = ids
    return request.prompt_ids


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
    input_ids = torch.tensor([tokenize(lm, request)], device=lm.device)
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
    return build_result(lm, request, new_ids, started, first, finished)


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


def _text(lm: LoadedModel, ids: list[int]) -> str:
    """Text of token ids. Synthetic models draw ids from their own (larger) vocabulary, so they
    are folded into the tokenizer's range: the text is meaningless either way."""
    if lm.synthetic:
        ids = [i % len(lm.tokenizer) for i in ids]
    return lm.tokenizer.decode(ids, skip_special_tokens=True,
                               clean_up_tokenization_spaces=False)


def decode(lm: LoadedModel, ids: list[int]) -> str:
    """Text of generated ids, leading whitespace dropped: what a client receives, whole or
    streamed (`Detokenizer` gives the same text piece by piece)."""
    return _text(lm, ids).lstrip()


class Detokenizer:
    """The text of a growing list of token ids, as it grows: `push(token_id)` returns the new
    text. tokenizers' own incremental decoder (`DecodeStream`, in Rust: under a microsecond a
    token, against 5 µs for decoding a window in Python) holds back a token that ends inside a
    UTF-8 character until the next one completes it. The pieces add up to `decode(lm, ids)`, but
    for a last character left incomplete."""

    def __init__(self, lm: LoadedModel):
        self.tokenizer = lm.tokenizer.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.fold = len(lm.tokenizer) if lm.synthetic else None  # as `_text` folds them
        self.started = False  # leading whitespace is dropped, as `decode` drops it

    def push(self, token_id: int) -> str:
        if self.fold is not None:
            token_id %= self.fold
        new = self.stream.step(self.tokenizer, token_id) or ""
        if not self.started and new:
            new = new.lstrip()
            self.started = bool(new)
        return new


WARMUP_TOKENS = 150


def warmup(lm: LoadedModel, runs: int = 1, max_tokens: int = WARMUP_TOKENS) -> None:
    """Run throwaway generations so CUDA context, kernels and allocator are ready before timing.
    The KV cache grows by one token per step and each new length can meet new kernels, so warm
    up over as many tokens as will be timed (after an 8-token warm-up, a first 150-token
    request ran 2.8-5x slower than the next on an H100: benchmarks/RESULTS.md)."""
    for _ in range(runs):
        generate(lm, "Warm-up", max_tokens=max_tokens, temperature=0)


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """Ids that end a generation: those of the model's generation config, as `generate` uses
    them (one id or a list). Synthetic models have none: they never stop early."""
    configured = None if lm.synthetic else lm.model.generation_config.eos_token_id
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return {i for i in ids if i is not None}


def build_result(lm: LoadedModel, request: Request, new_ids: list[int], started: float,
                 first_token_at: float, finished: float, detokenize: bool = True) -> Result:
    """Result of one request from its new ids (a final stop token is not counted) and host
    times (perf_counter): start, first token on the CPU, last token on the CPU. With
    `detokenize` False its text is left empty, for whoever receives it to decode from
    `token_ids`."""
    stopped = bool(new_ids) and new_ids[-1] in stop_token_ids(lm)
    if stopped:
        reason = "stop"
    elif request.cancelled.is_set() and len(new_ids) < request.max_tokens:
        reason = "cancelled"  # its client went away: the engine stopped it early
    else:
        reason = "length"
    n = len(new_ids) - (1 if stopped else 0)
    total_ms = (finished - started) * 1000
    ttft_ms = (first_token_at - started) * 1000
    tpot = (total_ms - ttft_ms) / (n - 1) if n > 1 else None
    return Result(
        generated_text=decode(lm, new_ids) if detokenize else "", token_ids=new_ids,
        prompt=request.prompt, tokens_generated=n,
        prompt_tokens=len(request.prompt_ids), time_to_first_token_ms=round(ttft_ms, 2),
        inference_time_ms=round(total_ms, 2),
        tokens_per_second=round(n / (total_ms / 1000), 2) if total_ms > 0 else 0.0,
        time_per_output_token_ms=round(tpot, 3) if tpot is not None else None,
        device=lm.device.type, model=lm.name, synthetic=lm.synthetic,
        finish_reason=reason,
    )

