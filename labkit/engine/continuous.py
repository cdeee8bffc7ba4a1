"""Continuous batching: the batch is re-formed at every step.

Static batching (`labkit.engine.batched`) starts a batch and runs it until its longest row ends;
a request that arrives meanwhile waits for all of it. Here, every `step()`:

1. takes in new requests, and drops those whose client went away (their blocks are freed);
2. admits waiting requests, oldest first, while the KV cache has blocks for their prompts
   (a prompt's longest prefix already in the cache is shared, not computed again);
3. prefills up to `prefill_chunk` prompt tokens of the admitted ones (a long prompt is split
   over several steps, so the requests already decoding are never held up for long);
4. runs one decode step for every request that has its first token: each gets its next token,
   and those that finish leave at once, handing their blocks to whoever comes next.

Who runs, and who is preempted when the cache runs out, is `labkit.engine.scheduler`'s policy
over the block tables of `labkit.engine.block_manager`; a request in here is a
`labkit.engine.sequence.Sequence`. The model is `labkit.engine.llama` over
`labkit.engine.kv_cache`, run by `labkit.engine.runner`; sampling is `labkit.engine.sampling`'s,
per request; prompts and results are `labkit.engine.text`'s. `ContinuousEngine.build` makes an
engine for a loaded model, `warm_up` captures its CUDA graphs. `generate(requests)` runs a list
to the end (notebooks, benchmarks); a server calls `add` from any thread and `step` in a loop on
its generation thread (`labkit.serve.schedulers.ContinuousScheduler`).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable

import torch

from labkit.engine import quant, text
from labkit.engine.block_manager import BlockManager
from labkit.engine.device import to_device
from labkit.engine.kv_cache import FP8, PagedKVCache, resolve_kv_dtype
from labkit.engine.llama import Llama
from labkit.engine.model import LoadedModel
from labkit.engine.request import PromptTooLong, Request, Result
from labkit.engine.runner import Chunk, ModelRunner
from labkit.engine.sampling import hold_stop_tokens, next_tokens, step_seeds
from labkit.engine.scheduler import Scheduler
from labkit.engine.sequence import Sequence

log = logging.getLogger(__name__)

DEFAULT_MAX_RUNNING = 256
DEFAULT_PREFILL_CHUNK = 2048  # prompt tokens prefilled per step, across requests
# Decode graphs captured at warm-up: rows' contexts of up to 64 pages (1,024 tokens); longer
# ones capture theirs on first use. What they hold: benchmarks/graph_memory.py.
WARMUP_GRAPH_PAGES = 64


def check_fits(request: Request, cache_tokens: int) -> None:
    """PromptTooLong (413) when prompt + max_tokens could never fit in the whole cache (less
    one: the last token generated is never fed back, so never stored); a request that fits is
    marked so (`fits_cache`), and an engine with that cache takes it unchecked."""
    needed = len(request.prompt_ids) + request.max_tokens - 1
    if needed > cache_tokens:
        raise PromptTooLong(
            f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({request.max_tokens}) "
            f"needs {needed} tokens of KV cache (all but the last token generated), more than "
            f"the whole cache holds ({cache_tokens}); shorten it, or give the cache more memory")
    request.fits_cache = cache_tokens


def default_kv_cache_gb(device: torch.device) -> float:
    """KV cache memory when the user grants none: a tenth of the card (room for several
    servers on one GPU, as in notebook 07), or 0.25 GB on the CPU."""
    if device.type != "cuda":
        return 0.25
    return round(torch.cuda.get_device_properties(device).total_memory / 1e9 * 0.10, 2)


class InFlight:
    """A launched step (decode, or the end of prefills): its rows and their sampled tokens,
    still on the device. The copy to the host starts at once; `on_host` waits for it."""

    def __init__(self, rows: list[Sequence], tokens: torch.Tensor):
        self.rows, self.tokens = rows, tokens
        self._host = tokens.to("cpu", non_blocking=True)
        self._ready = None
        if tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def on_host(self) -> tuple[list[int], float]:
        """The tokens, and the seconds the host waited for the device to produce them."""
        waited = 0.0
        if self._ready is not None and not self._ready.query():
            began = time.perf_counter()
            self._ready.synchronize()
            waited = time.perf_counter() - began
        return self._host.tolist(), waited


class ContinuousEngine:
    def __init__(self, lm: LoadedModel, model: Llama, cache: PagedKVCache,
                 max_running: int = DEFAULT_MAX_RUNNING,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK, cuda_graphs: bool = True,
                 prefix_cache: bool = True):
        self.lm, self.cache = lm, cache
        self.runner = ModelRunner(model, cache, cuda_graphs)
        self.block_manager = BlockManager(cache.num_pages, cache.page_size,
                                          enable_caching=prefix_cache)
        self.scheduler = Scheduler(self.block_manager, max_running, prefill_chunk)
        self.stop_ids = text.stop_token_ids(lm)
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._in_flight: list[InFlight] = []  # steps whose tokens the host has not seen yet
        self.decode_steps = self.decode_tokens = self.prefill_tokens = 0
        self.last_step_tokens = 0
        self.device_wait_s = 0.0  # host time spent waiting for a step's tokens
        # False: results come with token ids and empty text, for the caller to decode (the
        # engine process leaves it to the server, off the loop that keeps the GPU fed).
        self.detokenize = True

    @classmethod
    def build(cls, lm: LoadedModel, kv_cache_gb: float | None = None,
              max_running: int = DEFAULT_MAX_RUNNING, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
              cuda_graphs: bool = True, quantization: str | None = None,
              prefix_cache: bool = True, kv_cache_dtype: str | None = None
              ) -> ContinuousEngine:
        """The engine for `lm`: a KV cache of `kv_cache_gb` (default: `default_kv_cache_gb`),
        its full pages shared between requests with the same prefix unless `prefix_cache` is
        False (`labkit.engine.block_manager`), and the compact Llama, its linear weights in FP8
        with `quantization="fp8"` (`labkit.engine.quant`). `kv_cache_dtype="fp8"` stores the
        cache in FP8: twice the tokens in the same memory (`labkit.engine.kv_cache`). On a GPU
        the Hugging Face model's fused-away weights are freed, so the weights are held once."""
        memory_gb = kv_cache_gb if kv_cache_gb is not None else default_kv_cache_gb(lm.device)
        kv_dtype = resolve_kv_dtype(kv_cache_dtype, lm.dtype)
        if kv_dtype == FP8:
            quant.check_supported(lm.device, "--kv-cache-dtype fp8", "--kv-cache-dtype auto")
        cache = PagedKVCache.sized(lm.config, memory_gb, kv_dtype, lm.device)
        model = Llama.from_hf(lm.model, free_source=lm.device.type == "cuda",
                              quantization=quantization)
        engine = cls(lm, model, cache, max_running=max_running, prefill_chunk=prefill_chunk,
                     cuda_graphs=cuda_graphs, prefix_cache=prefix_cache)
        log.info("Continuous batching: KV cache of %.2f GB in %s = %d pages of %d tokens (%d "
                 "tokens), up to %d requests at once, prefill chunks of %d tokens, prefix cache "
                 "%s", memory_gb, str(kv_dtype).removeprefix("torch."), engine.block_manager.total,
                 cache.page_size, cache.tokens, max_running, prefill_chunk,
                 "on" if prefix_cache else "off")
        return engine

    def warm_up(self, runs: int, max_tokens: int) -> None:
        """Capture the CUDA graphs of decode steps of every padded row count up to max_running
        and page count up to WARMUP_GRAPH_PAGES, and of small prefills of short prompts, then
        run `runs` throwaway generations: no request waits for a capture of those (a capture in
        a busy server's step stalls every request: benchmarks/RESULTS.md). Each run is a greedy
        request beside a sampled one (temperature 0.7, top_p 0.9, the seed's defaults), so that
        the sampling kernel is compiled here, not in the first sampled request's first step."""
        began = time.perf_counter()
        self.runner.capture_all(self.scheduler.max_running, WARMUP_GRAPH_PAGES)
        for _ in range(runs):
            self.generate([Request("warm-up", max_tokens, 0),
                           Request("warm-up", max_tokens, 0.7, top_p=0.9, seed=0)])
        log.info("Warm-up: %d run(s) through the continuous engine; CUDA graphs for (rows, "
                 "pages) %s and %d small prefills; in %.1f s", runs, sorted(self.runner.graphs),
                 len(self.runner.prefill_graphs), time.perf_counter() - began)

    # -- what callers use ------------------------------------------------------------------

    def check_fits(self, request: Request) -> None:
        """Tokenize `request` if it is not yet (the model's context checked) and check that it
        fits the whole cache: PromptTooLong if it never could."""
        text.tokenize(self.lm, request)
        check_fits(request, self.cache.tokens)

    def add(self, request: Request, on_finish: Callable[[Result], None] | None = None) -> None:
        """Queue `request` (from any thread); `on_finish(result)` is called on the engine's
        thread when it is done. A request from Python is checked here (PromptTooLong if it could
        never fit); one that a server checked for this cache where it entered is not checked
        again."""
        if request.fits_cache != self.cache.tokens:
            self.check_fits(request)
        rng = None if request.greedy else random.Random(request.seed)
        self._inbox.put(Sequence(request, on_finish, time.perf_counter(),
                                 list(request.prompt_ids), len(request.prompt_ids), rng))
        self._wake.set()

    def has_work(self) -> bool:
        return bool(self.scheduler.has_work() or self._in_flight or not self._inbox.empty())

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until a request is added (or timeout); True if there is work."""
        if not self.has_work():
            self._wake.wait(timeout)
        self._wake.clear()
        return self.has_work()

    def generate(self, requests: list[Request]) -> list[Result]:
        """Run `requests` to the end; results in order (for notebooks and benchmarks). All or
        none: one that could never run (PromptTooLong) is refused before any is queued."""
        for request in requests:
            if request.fits_cache != self.cache.tokens:
                self.check_fits(request)
        results: dict[int, Result] = {}
        for index, request in enumerate(requests):
            self.add(request, lambda result, index=index: results.__setitem__(index, result))
        while self.has_work():
            self.step()
        return [results[index] for index in range(len(requests))]

    def reset(self) -> None:
        """Drop every request and free its blocks (after a failed step: nothing is half-done)."""
        while not self._inbox.empty():
            self._inbox.get()
        self._in_flight = []
        self.scheduler.reset()

    def stats(self) -> dict:
        blocks = self.block_manager
        return {
            "running": self.scheduler.running,
            "waiting": len(self.scheduler.waiting) + self._inbox.qsize(),
            "kv_pages_used": blocks.used,  # held by a request (evictable cached pages are free)
            "kv_pages_total": blocks.total,
            "kv_page_tokens": self.cache.page_size,
            "kv_cache_dtype": "fp8" if self.cache.dtype == FP8 else str(self.cache.dtype
                                                                     ).removeprefix("torch."),
            "prefix_cache": blocks.enable_caching,
            # vLLM's counters, in prompt tokens: looked up at admission, and found cached
            "prefix_cache_queries": blocks.prefix_cache_queries,
            "prefix_cache_hits": blocks.prefix_cache_hits,
            "kv_pages_cached": len(blocks.allocator.cached),  # held or evictable
            "kv_pages_evictable": blocks.allocator.evictable,
            "preemptions": self.scheduler.preemptions,
            "decode_steps": self.decode_steps,
            "tokens_per_step": (round(self.decode_tokens / self.decode_steps, 2)
                                if self.decode_steps else None),
            "last_step_tokens": self.last_step_tokens,
            "decode_tokens": self.decode_tokens,
            "prefill_tokens": self.prefill_tokens,
            # Where the engine's thread spent its time: waiting for the GPU (the GPU is the
            # bottleneck) or not (the host is), and capturing CUDA graphs of new shapes.
            "device_wait_s": round(self.device_wait_s, 4),
            "graph_capture_s": round(self.runner.capture_s, 4),
            "cuda_graph_shapes": sorted(self.runner.graphs),
            "prefill_graph_shapes": sorted(self.runner.prefill_graphs),
        }

    # -- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        while not self._inbox.empty():
            self.scheduler.add(self._inbox.get())
        for seq in self.scheduler.drop_cancelled():
            self._finish(seq, time.perf_counter())
        self.scheduler.admit()
        if self.scheduler.prefilling:
            self._prefill()
        if self.scheduler.decoding:
            self._decode()
        else:
            self._flush()

    def _prefill(self) -> None:
        batch = self.scheduler.prefill_batch()
        logits = self.runner.prefill([Chunk(seq.ids[seq.cached:seq.cached + n], seq.cached,
                                            seq.block_table) for seq, n in batch])
        done = []
        for row, (seq, n) in enumerate(batch):
            seq.cached += n
            self.block_manager.cache_blocks(seq, seq.cached)
            if seq.cached == len(seq.ids):  # whole prompt in the cache: its next token
                done.append(row)
        self.prefill_tokens += sum(n for _, n in batch)
        ready = [batch[row][0] for row in done]
        self.scheduler.prefilled(ready)
        if done:  # their first tokens reach the host with the next decode step's intake
            tokens = self._choose(ready, logits[to_device(done, logits.device)])
            for seq in ready:
                seq.pending += 1
            self._in_flight.append(InFlight(ready, tokens))

    def _decode(self) -> None:
        """Launch this step's decode, then take in the tokens of the steps before it while the
        GPU computes this one: the host's bookkeeping (streaming, stop checks, results)
        overlaps the device's work instead of leaving it idle between steps. A row's input
        token may still be on the device (sampled by an earlier step): it is read there."""
        self.scheduler.make_room(self._flush)
        rows = [seq for seq in self.scheduler.decoding if not seq.steps_over]
        previous, self._in_flight = self._in_flight, []
        if rows:
            self._in_flight.append(self._launch(rows, previous))
        for step in previous:
            self._take_tokens(step)

    def _launch(self, rows: list[Sequence], previous: list[InFlight]) -> InFlight:
        carried = None
        if any(seq.pending for seq in rows):
            where, offset = {}, 0
            for step in previous:  # a row's token sits in exactly one earlier step
                where.update({id(seq): offset + row for row, seq in enumerate(step.rows)})
                offset += len(step.rows)
            tokens = torch.cat([step.tokens for step in previous])
            pick = [where[id(seq)] if seq.pending else -1 for seq in rows]
            carried = (to_device(pick, tokens.device), tokens)
        chunks = [Chunk([0 if seq.pending else seq.ids[-1]], seq.length - 1, seq.block_table)
                  for seq in rows]
        tokens = self._choose(rows, self.runner.decode(chunks, carried))
        for seq in rows:
            seq.pending += 1
        self.decode_steps += 1
        self.decode_tokens += len(rows)
        self.last_step_tokens = len(rows)
        return InFlight(rows, tokens)

    def _take_tokens(self, step: InFlight) -> None:
        tokens, waited = step.on_host()
        self.device_wait_s += waited
        now = time.perf_counter()
        for seq, token in zip(step.rows, tokens, strict=True):
            seq.pending -= 1
            if not seq.finished:  # a row that stopped one step ago ran once more: dropped
                self._accept(seq, token, now)

    def _flush(self) -> bool:
        """Take in every step in flight now (before preempting: a victim must have no token
        on the way); False if there was none."""
        previous, self._in_flight = self._in_flight, []
        for step in previous:
            self._take_tokens(step)
        return bool(previous)

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Each row's next token on the device, by its own request's sampling (no sync)."""
        device = logits.device
        held = [row for row, seq in enumerate(seqs)
                if not seq.request.may_stop(seq.produced)]
        hold_stop_tokens(logits, held, self.stop_ids)
        seeds = step_seeds([seq.rng for seq in seqs], device)
        if seeds is None:  # all greedy: no per-row parameters to send to the device
            return logits.argmax(-1)
        requests = [seq.request for seq in seqs]
        temperature = to_device([r.temperature for r in requests], device, torch.float32)
        top_p = to_device([r.top_p or 1.0 for r in requests], device, torch.float32)
        return next_tokens(logits, temperature, top_p, seeds)

    def _accept(self, seq: Sequence, token: int, now: float) -> None:
        """A new token of `seq` reaches the host: streamed, and the request ends if it should."""
        seq.ids.append(token)
        if (len(seq.ids) - 1) % self.cache.page_size == 0:  # the tokens before it fill a page
            self.block_manager.cache_blocks(seq, len(seq.ids) - 1)  # (all in the KV cache)
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.request.emit(token)
        if token in self.stop_ids or len(seq.ids) - seq.prompt_len >= seq.request.max_tokens \
                or seq.request.cancelled.is_set():
            self.scheduler.retire(seq)
            self._finish(seq, now)

    def _finish(self, seq: Sequence, now: float) -> None:
        """`seq` is out of the scheduler, its blocks freed: its result to whoever waits."""
        seq.finished = True
        if seq.on_finish is None:
            return
        started = seq.admitted_at or now
        result = text.build_result(self.lm, seq.request, seq.generated, started,
                                   seq.first_token_at or now, now, self.detokenize)
        result.queue_time_ms = round((started - seq.added_at) * 1000, 3)
        seq.on_finish(result)
