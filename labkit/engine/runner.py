"""Runs the compact Llama on batches the scheduler picked: packs them into tensors, and replays
decode steps from CUDA graphs.

A decode step's tensors depend only on (rows, pages per row). Rounding both up to a power of two
leaves a handful of shapes; each is captured once as a CUDA graph (on first use, or at warm-up)
and replayed after that, so a step costs one launch from Python instead of ~20 per layer. Padded
rows read and write the padding page (page 0) and their logits are dropped.

Prefill chunks have every shape under the sun (rows × chunk lengths). A long one keeps the GPU
busy on its own and runs eagerly. Short ones (new requests' short prompts, the usual case while
serving) are mostly Python launching ~20 kernels per layer, during which the GPU idles: those
are padded to powers of two too (widths up to PREFILL_GRAPH_WIDTH, PREFILL_GRAPH_TOKENS in all)
and replayed from graphs. That holds for many rows at once as well: when a wave of requests
returns to a busy server, dozens are admitted in the same step, and an eager prefill of them
held the decoding requests up for milliseconds of host time.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama

log = logging.getLogger(__name__)

MIN_GRAPH_PAGES = 8  # smallest pages-per-row a graph is captured for (128 tokens of 16)
# A graph's output stays allocated as long as the graph lives. Graphs of up to this many rows
# end with their logits (batch-1 decoding cannot spare a launch after the replay); larger ones
# end with the last hidden state, and the logits of the real rows are computed after the
# replay, so that each graph does not hold (rows × vocabulary) logits of its own: for the 3B
# shape, the server's warm-up graphs would hold ~1 GB of them.
GRAPH_LOGITS_ROWS = 8
# Prefills replayed from graphs: up to 64 tokens per row and 64 pages, 2,048 tokens in all
# (padded rows × padded width); larger ones run eagerly.
PREFILL_GRAPH_WIDTH, PREFILL_GRAPH_PAGES, PREFILL_GRAPH_TOKENS = 64, 64, 2048


@dataclass
class Chunk:
    """Tokens of one request to run this step: `tokens` at positions start, start+1, ...;
    `pages` is the request's block table (it already covers every position)."""

    tokens: list[int]
    start: int
    pages: list[int]


class ModelRunner:
    def __init__(self, model: Llama, cache: PagedKVCache, cuda_graphs: bool = True):
        self.model, self.cache = model, cache
        self.device = cache.kv.device
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs: dict[tuple[int, int], _StepGraph] = {}  # decode: (rows, pages)
        self.prefill_graphs: dict[tuple[int, int, int], _StepGraph] = {}  # (rows, width, pages)
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graphs else None
        self.capture_s = 0.0  # spent capturing graphs (a step that captures waits for it)

    def prefill(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits (rows, vocab) after each chunk's last token: from a graph when the chunks
        are few and short, else eagerly. Valid until the next step: a graph's logits are its
        output buffer, and the graphs share one memory pool, so another one's step may write
        over them (the engine samples from them at once); copy what must outlive the step."""
        width = max(len(chunk.tokens) for chunk in chunks)
        pages = max(len(chunk.pages) for chunk in chunks)
        shape = (padded(len(chunks)), padded(width), max(MIN_GRAPH_PAGES, padded(pages)))
        if not self.cuda_graphs or not fits_prefill_graph(*shape):
            packed = self._pack(chunks, len(chunks), width, pages)
            return self.model(*unpack(packed, width), cache=self.cache)
        packed = self._pack(chunks, *shape, host=True)
        return self._graph(*shape).replay(packed, len(chunks))

    def decode(self, chunks: list[Chunk], carried: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor:
        """Logits (rows, vocab) of one token per chunk: from a CUDA graph when there is one
        for the padded shape, else eagerly. `carried` = (pick, tokens): rows whose pick is
        >= 0 take their input token from `tokens[pick]`, on the device (sampled by the step
        before, not seen by the host yet). Valid until the next step, as `prefill`'s."""
        pages = max(len(chunk.pages) for chunk in chunks)
        if not self.cuda_graphs:
            packed = self._pack(chunks, len(chunks), 1, pages)
            _carry(packed, carried)
            return self.model(*unpack(packed, 1), cache=self.cache)
        shape = (padded(len(chunks)), 1, max(MIN_GRAPH_PAGES, padded(pages)))
        packed = self._pack(chunks, *shape, host=True)
        return self._graph(*shape).replay(packed, len(chunks), carried)

    def capture_all(self, rows: int, pages: int) -> None:
        """Capture now, at warm-up, rather than in a request's step, the graph of every padded
        shape up to `rows` rows: decode steps of up to `pages` pages per row (at least
        MIN_GRAPH_PAGES, the fewest a graph has), and short prefills of 2 to
        PREFILL_GRAPH_WIDTH tokens per row (one token is a decode step's shape) within
        PREFILL_GRAPH_TOKENS."""
        if not self.cuda_graphs:
            return
        for row_count in _powers_of_two(1, padded(rows)):
            for page_count in _powers_of_two(MIN_GRAPH_PAGES, max(MIN_GRAPH_PAGES, pages)):
                self._graph(row_count, 1, page_count)
            for width in _powers_of_two(2, PREFILL_GRAPH_WIDTH):
                if fits_prefill_graph(row_count, width, MIN_GRAPH_PAGES):
                    self._graph(row_count, width, MIN_GRAPH_PAGES)

    def _graph(self, rows: int, width: int, pages: int) -> _StepGraph:
        """The graph of a padded step shape, captured on first use. Width 1 is a decode step's
        shape (a one-token prefill shares it: the same step)."""
        table, key = ((self.graphs, (rows, pages)) if width == 1
                      else (self.prefill_graphs, (rows, width, pages)))
        if key not in table:
            began = time.perf_counter()
            # Without autograd: the weights require grad, and a graph captured with autograd
            # on keeps every layer's saved activations alive with its output (the warm-up's
            # graphs did, outside the engine's inference mode: benchmarks/graph_memory.py).
            with torch.no_grad():
                table[key] = _StepGraph(self, rows, width, pages)
            self.capture_s += time.perf_counter() - began
            log.info("Captured a CUDA graph for steps of %d rows × %d tokens × %d pages in "
                     "%.0f ms", rows, width, pages, (time.perf_counter() - began) * 1000)
        return table[key]

    def _pack(self, chunks: list[Chunk], rows: int, width: int, pages: int,
              host: bool = False) -> torch.Tensor:
        """One tensor (rows, 3 × width + pages + 1): each row's tokens, positions, slots, block
        table and last column, padded with zeros (token 0 at position 0 in the padding page's
        slot 0), built on the host in one go: one copy to the device per step."""
        if width == 1:
            packed = self._pack_decode(chunks, rows, pages)
        else:
            packed = self._pack_lists(chunks, rows, width, pages)
        packed = torch.from_numpy(packed)
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        return packed if host else packed.to(self.device, non_blocking=True)

    def _pack_decode(self, chunks: list[Chunk], rows: int, pages: int) -> np.ndarray:
        """`_pack` of one token a row, through numpy: a step of 512 rows is packed every few
        milliseconds, and doing it row by row in Python took twice as long."""
        packed = np.zeros((rows, 4 + pages), dtype=np.int64)
        used, size = len(chunks), self.cache.page_size
        counts = np.fromiter((len(chunk.pages) for chunk in chunks), np.int64, used)
        table = np.fromiter(itertools.chain.from_iterable(chunk.pages for chunk in chunks),
                            np.int64, int(counts.sum()))
        # every table entry's row, and its column: its index within its own row's pages
        row = np.repeat(np.arange(used), counts)
        column = np.arange(len(table)) - np.repeat(np.cumsum(counts) - counts, counts)
        packed[row, 3 + column] = table
        position = np.fromiter((chunk.start for chunk in chunks), np.int64, used)
        packed[:used, 0] = [chunk.tokens[0] for chunk in chunks]
        packed[:used, 1] = position
        packed[:used, 2] = packed[np.arange(used), 3 + position // size] * size + position % size
        return packed  # the last column (each row's last token) is 0

    def _pack_lists(self, chunks: list[Chunk], rows: int, width: int, pages: int) -> np.ndarray:
        slot, flat = self.cache.slot, []
        for chunk in chunks:  # one flat list, then numpy: much faster than nested lists
            pad = [0] * (width - len(chunk.tokens))
            span = range(chunk.start, chunk.start + len(chunk.tokens))
            flat += chunk.tokens
            flat += pad
            flat += span
            flat += pad
            flat += [slot(chunk.pages, p) for p in span]
            flat += pad
            flat += chunk.pages
            flat += [0] * (pages - len(chunk.pages))
            flat.append(len(chunk.tokens) - 1)
        packed = np.zeros((rows, 3 * width + pages + 1), dtype=np.int64)
        packed[:len(chunks)] = np.array(flat, dtype=np.int64).reshape(len(chunks), -1)
        return packed


def unpack(packed: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
    """Views (tokens, positions, slots, block_table, last) of a `_pack`ed tensor."""
    tokens, positions, slots, rest = packed.split([width, width, width,
                                                   packed.shape[1] - 3 * width], 1)
    return tokens, positions, slots, rest[:, :-1], rest[:, -1]


def fits_prefill_graph(rows: int, width: int, pages: int) -> bool:
    """Whether a padded prefill shape is replayed from a graph (else it runs eagerly)."""
    return width <= PREFILL_GRAPH_WIDTH and pages <= PREFILL_GRAPH_PAGES \
        and rows * width <= PREFILL_GRAPH_TOKENS


class _StepGraph:
    """One step of (rows, tokens per row, pages) captured as a CUDA graph over a fixed input
    buffer: a decode step (width 1) or a small prefill."""

    def __init__(self, runner: ModelRunner, rows: int, width: int, pages: int):
        device, self.model, cache = runner.device, runner.model, runner.cache
        self.packed = torch.zeros(rows, 3 * width + pages + 1, dtype=torch.long, device=device)
        inputs = unpack(self.packed, width)
        logits = rows <= GRAPH_LOGITS_ROWS
        # Warm up on a side stream (kernel selection, workspace allocation), then capture.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(*inputs, cache=cache, logits=logits)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=runner._pool):
            self.out = self.model(*inputs, cache=cache, logits=logits)  # logits or (x, residual)

    def replay(self, packed: torch.Tensor, used: int, carried=None) -> torch.Tensor:
        """Logits (used, vocab) of the first `used` rows (the rest are padding)."""
        self.packed.copy_(packed, non_blocking=True)
        _carry(self.packed, carried)
        self.graph.replay()
        if isinstance(self.out, torch.Tensor):
            return self.out[:used]
        x, residual = self.out
        return self.model.logits(x[:used], residual[:used])


def _carry(packed: torch.Tensor, carried) -> None:
    """Input tokens still on the device go into the packed step (column 0) there."""
    if carried is None:
        return
    pick, tokens = carried
    column = packed[:len(pick), 0]
    column.copy_(torch.where(pick >= 0, tokens[pick.clamp(min=0)], column))


def _powers_of_two(low: int, high: int) -> list[int]:
    """low, 2·low, 4·low, ... up to high (low a power of two)."""
    return [low << shift for shift in range(max(0, (high // low).bit_length()))]


def padded(n: int) -> int:
    """The power of two at or above n: the sizes graphs are captured for."""
    return 1 << max(0, (n - 1).bit_length())
