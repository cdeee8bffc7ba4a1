"""Which blocks of the paged KV cache each sequence holds (a block is one page of
`labkit.engine.kv_cache`, `block_size` tokens).

A sequence's block table lists its blocks in token order. Blocks need not be contiguous, so a
sequence grows a block at a time and a finished sequence's blocks go straight to the next one:
no memory is reserved for tokens a request has not generated yet (vLLM's PagedAttention).

Each block counts the sequences that hold it, and is free again when none does. Today every
block has one holder; the count is there for prefix caching, where sequences that start with
the same tokens share their full blocks (found by a hash of their tokens, freed ones evicted
least recently used first).

Block 0 is never handed out: padding tokens write there and padded block-table entries point
there, so padded rows need no special case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from labkit.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0  # the sequences holding it


class BlockAllocator:
    """The free blocks. A freed block is handed out again first (and at the start, low ids)."""

    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.total = num_blocks - 1  # block 0 is the padding block
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first

    @property
    def available(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.total - len(self._free)

    def allocate(self, count: int) -> list[int]:
        """`count` free blocks, each now held once."""
        if count > len(self._free):
            raise RuntimeError(f"{count} blocks asked, {len(self._free)} free")
        block_ids = [self._free.pop() for _ in range(count)]
        for block_id in block_ids:
            self.blocks[block_id].ref_count = 1
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Let go of each block once (and empty `block_ids`); a block nobody holds is free."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free.append(block_id)
        block_ids.clear()


class BlockManager:
    """Each sequence's block table: allocated for what it holds when admitted, grown a block at
    a time as it decodes, freed when it finishes or is preempted."""

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)

    @property
    def total(self) -> int:
        return self.allocator.total

    @property
    def used(self) -> int:
        return self.allocator.used

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether free blocks hold every token `seq` has on the host."""
        return self._missing(seq, len(seq.ids)) <= self.allocator.available

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token `seq` has on the host: its prompt (and, resumed after a
        preemption, what it had generated)."""
        seq.block_table += self.allocator.allocate(self._missing(seq, len(seq.ids)))

    def needs_block(self, seq: Sequence) -> bool:
        """Whether `seq`'s next token (the last one sampled, maybe still on the device) falls
        past its last block."""
        return self._missing(seq, seq.length) > 0

    def append_block(self, seq: Sequence) -> bool:
        """One more block for `seq`; False when none is free."""
        if not self.allocator.available:
            return False
        seq.block_table += self.allocator.allocate(1)
        return True

    def free(self, seq: Sequence) -> None:
        """`seq`'s blocks go back; none of its tokens is cached any more."""
        self.allocator.free(seq.block_table)
        seq.cached = 0

    def _missing(self, seq: Sequence, tokens: int) -> int:
        return self.blocks_for(tokens) - len(seq.block_table)
