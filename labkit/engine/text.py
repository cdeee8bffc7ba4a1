"""Text in and out of every engine: a request's prompt as the model's token ids (its fit to the
context checked once), the ids that end a generation, generated ids as text (whole, or piece by
piece as they stream), and a request's `Result` from its ids and host times.

The HF baseline (`hf_generate`), batched decoding (`batched`) and the continuous engine
(`continuous`) all use these, so a request reads and ends the same way on every path; a server,
which tokenizes and detokenizes on several threads, uses them through `TextSide`.
"""

from __future__ import annotations

import copy
import dataclasses
import threading

from tokenizers.decoders import DecodeStream

from labkit.engine.model import LoadedModel
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
    context, ids given by the caller too (past the context, RoPE's tables have no row)."""
    if request.prompt_ids is None:
        text = request.prompt if request.templated else format_prompt(lm, request.prompt)
        request.prompt_ids = lm.tokenizer(text, add_special_tokens=False).input_ids
    check_context(len(request.prompt_ids), request.max_tokens, lm.context_length)
    return request.prompt_ids


def check_context(prompt_tokens: int, max_tokens: int, context_length: int) -> None:
    """PromptTooLong when prompt + max_tokens cannot fit the model's context."""
    if prompt_tokens + max_tokens > context_length:
        raise PromptTooLong(
            f"prompt is {prompt_tokens} tokens; with max_tokens={max_tokens} that exceeds "
            f"the model's context of {context_length} tokens. Shorten the prompt or lower "
            "max_tokens.")


def stop_token_ids(lm: LoadedModel) -> set[int]:
    """Ids that end a generation: those of the model's generation config, as `generate` uses
    them (one id or a list). Synthetic models have none: they never stop early."""
    configured = None if lm.synthetic else lm.model.generation_config.eos_token_id
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return {i for i in ids if i is not None}


def _text(lm: LoadedModel, ids: list[int]) -> str:
    """Text of token ids. Synthetic models draw ids from their own (larger) vocabulary, so they
    are folded into the tokenizer's range: the text is meaningless either way."""
    if lm.synthetic:
        size = len(lm.tokenizer)  # asked once: a tokenizer's len() is not free, ids are many
        ids = [i % size for i in ids]
    return lm.tokenizer.decode(ids, skip_special_tokens=True,
                               clean_up_tokenization_spaces=False)


def decode(lm: LoadedModel, ids: list[int]) -> str:
    """Text of generated ids, leading whitespace dropped: what a client receives, whole or
    streamed (`Detokenizer` gives the same text piece by piece)."""
    return _text(lm, ids).lstrip()


class Detokenizer:
    """The text of a growing list of token ids, as it grows: `push(token_id)` returns the new
    text. tokenizers' own incremental decoder (`DecodeStream`, in Rust, far cheaper a token than
    decoding a window in Python) holds back a token that ends inside a UTF-8 character until the
    next one completes it. The pieces add up to `decode(lm, ids)`, but for a last character left
    incomplete."""

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


class TextSide:
    """The text work around `lm` on several threads (a server's): prompts are checked and
    tokenized on one thread (or another, for long ones), streamed text is detokenized on the
    thread that delivers tokens. A fast tokenizer is a Rust object that raises "Already
    borrowed" when two threads use it at once, so `lm`'s own tokenizer is left to the thread
    that generates (or delivers tokens), and every other thread gets a copy of its own."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self._local = threading.local()

    def tokenize(self, request: Request) -> None:
        tokenize(self._own_lm(), request)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self.lm)

    def chat_prompt(self, messages: list[dict]) -> str:
        return chat_prompt(self._own_lm(), messages)

    def _own_lm(self) -> LoadedModel:
        """`lm` with this thread's own copy of the tokenizer (made on the thread's first call)."""
        lm = getattr(self._local, "lm", None)
        if lm is None:
            lm = self._local.lm = dataclasses.replace(
                self.lm, tokenizer=copy.deepcopy(self.lm.tokenizer))
        return lm


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
