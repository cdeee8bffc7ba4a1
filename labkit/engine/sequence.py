"""A request inside the continuous engine: plain data that the scheduler, the block manager and
the step loop read and update."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from labkit.engine.request import Request, Result


@dataclass(eq=False)
class Sequence:
    """A request's tokens so far and the blocks that hold their keys and values. `ids` is the
    prompt followed by the generated tokens; the first `cached` of them are in the cache, in
    the blocks of `block_table` (token t in block `block_table[t // block_size]`), the first
    `num_cached_blocks` of those keyed in the prefix cache by `block_hashes` (vLLM's names)."""

    request: Request
    on_finish: Callable[[Result], None] | None
    added_at: float
    ids: list[int]
    prompt_len: int
    rng: random.Random | None  # None: greedy
    block_table: list[int] = field(default_factory=list)
    cached: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, computed once
    num_cached_blocks: int = 0
    num_preemptions: int = 0
    pending: int = 0  # tokens sampled on the device, not yet on the host (0 to 2)
    finished: bool = False
    admitted_at: float | None = None
    first_token_at: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.ids[self.prompt_len:]

    @property
    def produced(self) -> int:
        """Tokens generated so far, those still on the device included."""
        return len(self.ids) - self.prompt_len + self.pending

    @property
    def all_sampled(self) -> bool:
        """Its last token is sampled (maybe still on the device): it runs no more steps, and
        that token is never fed back into the cache."""
        return self.produced >= self.request.max_tokens

    @property
    def steps_over(self) -> bool:
        """It runs no more decode steps: its last token is sampled, or its client went away
        (a token on the way is still taken in, and ends it)."""
        return self.all_sampled or self.request.cancelled.is_set()

    @property
    def length(self) -> int:
        """Tokens so far, those still on the device included."""
        return len(self.ids) + self.pending
