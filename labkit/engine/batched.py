"""Batched generation: many requests share each forward pass of the model.

One prefill runs every prompt at once, then each decode step runs one forward for all rows still
generating, over a shared KV cache: eagerly over a `DynamicCache`, or over a static cache whose
step replays a CUDA graph (`labkit.engine.static_decode`, passed as `static=`). Prompts are
left-padded so every row's next token sits in the last column; the attention mask hides the
padding and per-row position ids give each token the position it would have alone, so a row's
logits are those of the same request generated on its own (greedy output equals
`hf_generate.generate`'s).

Each row keeps its own max_tokens, temperature, top_p and seed; each new token goes to its
request's `on_token` as soon as it is on the host, and a request whose `cancelled` is set leaves
the batch at the next step. Sampling draws from a per-row
`random.Random` on the host, so a seeded request gets the same text whatever else shares its
batch. Timing is per row: TTFT is batch start → the row's first token on the CPU,
inference time is batch start → its own last token; a row that stops early is not billed the
batch's length.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from labkit.engine import text
from labkit.engine.model import LoadedModel, synchronize
from labkit.engine.request import Request, Result
from labkit.engine.sampling import hold_stop_tokens, next_tokens, step_seeds
from labkit.engine.static_decode import StaticDecoders, last_logits_only


def generate_batch(lm: LoadedModel, requests: list[Request],
                   on_finish: Callable[[int, Result], None] | None = None,
                   static: StaticDecoders | None = None) -> list[Result]:
    """Generate every request in one batch; results in request order. Every prompt is checked
    against the context before anything runs: one that does not fit raises PromptTooLong,
    prefixed with the request's index. `on_finish(index, result)`, if given, is called as each
    row finishes (a server answers that request at once instead of after the batch's longest
    row). With `static`, decoding runs over its static caches (CUDA graphs on a GPU,
    `labkit.engine.static_decode`); without, eagerly over a `DynamicCache`."""
    prompts = [torch.tensor(_tokenize(lm, i, r)) for i, r in enumerate(requests)]
    if not prompts:
        return []
    input_ids, attention_mask = _left_pad(prompts, lm.tokenizer.pad_token_id or 0, lm.device)
    # Position of each token in its own prompt; padding gets 0 (masked anyway).
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if static is None:
        decoder = _DynamicDecoder(lm.model)
    else:
        decoder = static.decoder(len(requests), input_ids.shape[1]
                                 + max(r.max_tokens for r in requests))
    batch = _Rows(lm, requests, on_finish)
    synchronize(lm.device)
    batch.started = time.perf_counter()
    with torch.inference_mode():
        logits = decoder.prefill(input_ids, attention_mask, position_ids)
        while True:
            tokens = batch.sample(logits)
            host_tokens = tokens.tolist()  # waits for the device, so the clock reads after it
            keep = batch.take(host_tokens, time.perf_counter())
            if not keep:
                break
            if len(keep) < len(batch.rows):
                index = torch.tensor(keep, device=lm.device)
                decoder.keep(index)
                batch.keep(keep, index)
                tokens = tokens[index]
            logits = decoder.step(tokens)
    return batch.results


class _Rows:
    """The batch's rows on the host: the requests still in it, their sampling parameters, their
    tokens so far, and the results of those that finished."""

    def __init__(self, lm: LoadedModel, requests: list[Request],
                 on_finish: Callable[[int, Result], None] | None):
        self.lm, self.requests, self.on_finish = lm, requests, on_finish
        device = lm.device
        self.temperature = torch.tensor([float(r.temperature) for r in requests], device=device)
        self.top_p = torch.tensor([float(r.top_p or 1.0) for r in requests], device=device)
        self.rngs = [None if r.greedy else random.Random(r.seed) for r in requests]
        self.stop_ids = text.stop_token_ids(lm)
        self.rows = list(range(len(requests)))  # request index of each row still in the batch
        self.new_ids: list[list[int]] = [[] for _ in requests]
        self.results: list[Result | None] = [None] * len(requests)
        self.first_at = [0.0] * len(requests)
        self.started = 0.0

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token, on the device, by its own request's sampling."""
        seeds = step_seeds([self.rngs[i] for i in self.rows], self.lm.device)
        held = [row for row, i in enumerate(self.rows)
                if not self.requests[i].may_stop(len(self.new_ids[i]))]
        hold_stop_tokens(logits, held, self.stop_ids)  # min_tokens / ignore_eos
        return next_tokens(logits, self.temperature, self.top_p, seeds)

    def take(self, tokens: list[int], now: float) -> list[int]:
        """Each row's new token on the host: streamed, and its request answered if it ends
        there. Returns the rows that go on."""
        keep = []
        for row, (i, token) in enumerate(zip(self.rows, tokens, strict=True)):
            request = self.requests[i]
            if not self.new_ids[i]:
                self.first_at[i] = now
            self.new_ids[i].append(token)
            request.emit(token)
            if not (token in self.stop_ids or request.cancelled.is_set()
                    or len(self.new_ids[i]) >= request.max_tokens):
                keep.append(row)
                continue
            self.results[i] = text.build_result(self.lm, request, self.new_ids[i], self.started,
                                                self.first_at[i], now)
            if self.on_finish is not None:
                self.on_finish(i, self.results[i])
        return keep

    def keep(self, keep: list[int], index: torch.Tensor) -> None:
        """Only the rows `keep` (`index` on the device) go on."""
        self.temperature, self.top_p = self.temperature[index], self.top_p[index]
        self.rows = [self.rows[row] for row in keep]


class _DynamicDecoder:
    """Eager decoding over a `DynamicCache` that grows by one token per step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.prefill_kwargs = last_logits_only(model)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> torch.Tensor:
        self.attention_mask, self.position_ids = attention_mask, position_ids[:, -1:]
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, past_key_values=self.cache, use_cache=True,
                          **self.prefill_kwargs).logits[:, -1]

    def keep(self, index: torch.Tensor) -> None:
        # Finished rows leave the batch: later steps compute only live rows, which shrinks the
        # tail when lengths differ. The price is one copy of the KV cache per step in which some
        # row finishes, no more than one step's cache reads.
        self.cache.batch_select_indices(index)
        self.attention_mask = self.attention_mask[index]
        self.position_ids = self.position_ids[index]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        self.attention_mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        self.position_ids = self.position_ids + 1
        return self.model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                          position_ids=self.position_ids, past_key_values=self.cache,
                          use_cache=True).logits[:, -1]


def _tokenize(lm: LoadedModel, index: int, request: Request) -> list[int]:
    """Prompt ids of one request (`text.tokenize`); an error names the request."""
    try:
        return text.tokenize(lm, request)
    except ValueError as err:  # PromptTooLong: keep the type, name the request
        raise type(err)(f"request {index}: {err}") from None


def _left_pad(prompts: list[torch.Tensor], pad_id: int, device: torch.device):
    """(input_ids, attention_mask), both (batch, longest prompt), prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = ids
        attention_mask[row, width - len(ids):] = 1
    return input_ids.to(device), attention_mask.to(device)
