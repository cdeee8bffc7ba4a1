"""Which sequences the continuous engine runs at each step: its policy, apart from the step
loop that launches prefills and decodes and takes their tokens in (`labkit.engine.continuous`).

- Admission: waiting sequences, oldest first, while fewer than `max_running` run, this step's
  prefill budget is not spent, and free blocks hold the tokens they have that are not in the
  prefix cache (`labkit.engine.block_manager`). Only that is checked, not `max_tokens`: the
  cache is never over-committed, yet holds no block a request may never use. Admitting no more
  than can start prefilling (vLLM's token budget) lets a request admitted one step later find
  the prefix that an earlier one has just computed.
- Prefill: up to `prefill_chunk` prompt tokens a step across the admitted sequences, oldest
  first; a long prompt is split over steps, so the requests decoding are never held up long.
- Room: a block for each decoding sequence's next token (a free block, else a cached block
  nobody holds, evicted); none for a sequence whose last token is on its way, never written.
  When none is left, the tokens still on the way are taken in first (they may end requests);
  then the latest admitted sequence is preempted: its blocks let go, back to the front of the
  queue, to be prefilled again (prompt and the tokens it had so far, less what the prefix cache
  still holds) when blocks free up.
- Cancelled requests leave before their next step; a decoding one with a token on the way
  runs no more steps, and leaves when that token arrives.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from labkit.engine.block_manager import BlockManager
from labkit.engine.sequence import Sequence


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_running: int, prefill_chunk: int):
        self.block_manager = block_manager
        self.max_running, self.prefill_chunk = max_running, prefill_chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: list[Sequence] = []  # admitted, prompt not fully in the cache yet
        self.decoding: list[Sequence] = []  # in admission order: the last is preempted first
        self.preemptions = 0

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def drop_cancelled(self) -> list[Sequence]:
        """Sequences whose client went away: out, blocks freed. A decoding one with a token on
        the way stays until that token arrives (its step reads its blocks), running no more
        steps meanwhile (`Sequence.steps_over`)."""
        dropped = []
        for queue in (self.waiting, self.prefilling, self.decoding):
            # pending first: a decoding row usually has a token on the way, so the Event is
            # asked of few rows in a 512-row step
            for seq in [s for s in queue if not s.pending and s.request.cancelled.is_set()]:
                queue.remove(seq)
                self.block_manager.free(seq)
                dropped.append(seq)
        return dropped

    def admit(self) -> None:
        budget = self.prefill_chunk - sum(len(s.ids) - s.cached for s in self.prefilling)
        while self.waiting and self.running < self.max_running and budget > 0:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                return  # first come, first served: nobody overtakes the oldest
            if self.prefilling and self.block_manager.computing_prefix(seq, self.prefilling):
                return  # its prefix is being computed: found cached once it is
            self.waiting.popleft()
            self.block_manager.allocate(seq)  # its cached prefix included: `cached` past it
            budget -= len(seq.ids) - seq.cached
            if seq.admitted_at is None:
                seq.admitted_at = time.perf_counter()
            self.prefilling.append(seq)

    def prefill_batch(self) -> list[tuple[Sequence, int]]:
        """The admitted sequences that prefill this step, oldest first, each with how many of
        its uncached tokens: `prefill_chunk` in all at most."""
        batch, budget = [], self.prefill_chunk
        for seq in self.prefilling:
            if budget == 0:
                break
            n = min(len(seq.ids) - seq.cached, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def prefilled(self, seqs: list[Sequence]) -> None:
        """`seqs` have every token in the cache: they decode from now on."""
        for seq in seqs:
            self.prefilling.remove(seq)
            self.decoding.append(seq)

    def make_room(self, flush: Callable[[], bool]) -> None:
        """A block for each decoding sequence's next token. When none is free, `flush()` takes
        in the steps in flight (False if there were none), which may finish requests; failing
        that, the latest admitted sequence is preempted (a victim has no token on the way)."""
        squeezed = False  # once a flush or a preemption ran, sequences may have left `decoding`
        for seq in list(self.decoding):
            if seq.steps_over:
                continue  # no next token to make room for
            while self.block_manager.needs_block(seq):
                if squeezed and seq not in self.decoding:
                    break  # it finished, or was preempted: it must not be handed blocks
                if self.block_manager.append_block(seq):
                    continue
                squeezed = True
                if not flush():  # the latest admitted goes: one still prefilling (prefills
                    # run oldest first, so those came after every decoding one), else the last
                    # decoding one, which may be seq itself
                    self._preempt(self.prefilling.pop() if self.prefilling
                                  else self.decoding.pop())

    def retire(self, seq: Sequence) -> None:
        """A decoding sequence is done: out, blocks freed."""
        self.decoding.remove(seq)
        self.block_manager.free(seq)

    def reset(self) -> None:
        """Every sequence out, every block freed, the prefix cache emptied (a failed step may
        have left blocks half-written)."""
        for seq in [*self.waiting, *self.prefilling, *self.decoding]:
            self.block_manager.free(seq)
        self.block_manager.reset_prefix_cache()
        self.waiting.clear()
        self.prefilling.clear()
        self.decoding.clear()

    def _preempt(self, seq: Sequence) -> None:
        """Its blocks let go (shared ones stay with their other holders; its own full ones stay
        cached, so its resumption may find them again)."""
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.preemptions += 1
