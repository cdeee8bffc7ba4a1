"""Which blocks of the paged KV cache each sequence holds (a block is one page of
`labkit.engine.kv_cache`, `block_size` tokens), and the prefix cache that shares them.

A sequence's block table lists its blocks in token order. Blocks need not be contiguous, so a
sequence grows a block at a time and a finished sequence's blocks go straight to the next one:
no memory is reserved for tokens a request has not generated yet (vLLM's PagedAttention).

Prefix caching (vLLM's automatic prefix caching): a full block is keyed by a hash chained over
every token up to and including it (the parent block's hash and the block's own tokens), so
two sequences whose first k blocks hold the same tokens find the same k keys. At admission a
sequence takes the blocks of its longest cached prefix (`ref_count` counts its holders) and
computes only the rest. A block nobody holds keeps its key while it can: it waits in an
evictable list, least recently used first, and is only evicted (key dropped, contents
overwritten) when a blank block is not there for a new allocation.

Block 0 is never handed out: padding tokens write there and padded block-table entries point
there, so padded rows need no special case.
"""

from __future__ import annotations

import collections
import hashlib
import math
from array import array
from dataclasses import dataclass

from labkit.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0  # the sequences holding it
    block_hash: bytes | None = None  # its key once full and cached


def hash_block_tokens(parent: bytes | None, tokens: list[int]) -> bytes:
    """A full block's key: its parent's key and its own tokens. A cryptographic hash, not
    Python's `hash`: prompts come from clients, and a collision would serve one request
    another's keys and values (vLLM moved to SHA-256 for that reason)."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockAllocator:
    """The blocks: held (`ref_count` > 0), blank (never cached, or evicted: handed out first,
    the last freed first, at the start low ids) or evictable (free but cached, oldest first)."""

    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.total = num_blocks - 1  # block 0 is the padding block
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.cached: dict[bytes, int] = {}  # block hash -> block id (held or evictable)

    @property
    def available(self) -> int:
        """Blocks a new allocation may take: blank ones, then evicted ones."""
        return len(self._free) + len(self._evictable)

    @property
    def evictable(self) -> int:
        return len(self._evictable)

    @property
    def used(self) -> int:
        return self.total - self.available

    def allocate(self, count: int) -> list[int]:
        """`count` blocks, each now held once, evicting cached ones only when no blank is left."""
        if count > self.available:
            raise RuntimeError(f"{count} blocks asked, {self.available} free")
        block_ids = [self._take() for _ in range(count)]
        for block_id in block_ids:
            self.blocks[block_id].ref_count = 1
        return block_ids

    def touch(self, block_ids: list[int]) -> None:
        """Hold cached blocks once more (an evictable one leaves the evictable list)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Key a full block by its hash, unless another block holds those tokens already (two
        sequences computed the same prefix at once): this one then stays uncached."""
        if block_hash not in self.cached:
            self.cached[block_hash] = block_id
            self.blocks[block_id].block_hash = block_hash

    def free(self, block_ids: list[int]) -> None:
        """Let go of each block once (and empty `block_ids`). A block nobody holds is blank
        again, or evictable if cached. Last block first: a sequence's tail is the least likely
        to be shared, so it is evicted first."""
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    self._free.append(block_id)
                else:
                    self._evictable[block_id] = None
        block_ids.clear()

    def reset_cache(self) -> None:
        """Forget every key (after a failed step a block's contents are not to be trusted)."""
        for block_id in self.cached.values():
            self.blocks[block_id].block_hash = None
        self._free += reversed(self._evictable)
        self._evictable.clear()
        self.cached.clear()

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        block_id, _ = self._evictable.popitem(last=False)  # least recently used
        del self.cached[self.blocks[block_id].block_hash]
        self.blocks[block_id].block_hash = None
        return block_id


class BlockManager:
    """Each sequence's block table: its cached prefix and new blocks for the rest when admitted,
    grown a block at a time as it decodes, freed when it finishes or is preempted; its full
    blocks cached as their tokens reach the KV cache (`cache_blocks`)."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size, self.enable_caching = block_size, enable_caching
        self.allocator = BlockAllocator(num_blocks)
        # vLLM's counters, in tokens: prompt tokens looked up, and those found cached
        self.prefix_cache_queries = self.prefix_cache_hits = 0

    @property
    def total(self) -> int:
        return self.allocator.total

    @property
    def used(self) -> int:
        return self.allocator.used

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether the blocks `seq` needs are there: new ones for what is not cached, and its
        cached blocks that nobody holds (they leave the evictable list)."""
        hits = self._cache_hits(seq)
        reclaimed = sum(self.allocator.blocks[b].ref_count == 0 for b in hits)
        needed = self._missing(seq, len(seq.ids)) - len(hits) + reclaimed
        return needed <= self.allocator.available

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token `seq` has on the host (its prompt and, resumed after a
        preemption, what it had generated): its longest cached prefix, shared, then new ones.
        Its `cached` count starts past the shared tokens, so only the rest is prefilled."""
        hits = self._cache_hits(seq)
        self.allocator.touch(hits)
        seq.block_table += hits
        seq.num_cached_blocks = len(hits)
        seq.cached = len(hits) * self.block_size
        seq.block_table += self.allocator.allocate(self._missing(seq, len(seq.ids)))
        if self.enable_caching and not seq.num_preemptions:  # as vLLM: first admissions only
            self.prefix_cache_queries += len(seq.ids)
            self.prefix_cache_hits += seq.cached

    def cache_blocks(self, seq: Sequence, tokens: int) -> None:
        """The first `tokens` of `seq` are in the KV cache (their writes launched: later steps
        run after them): its full blocks among them become cacheable."""
        full = min(tokens // self.block_size, len(seq.block_table))
        if not self.enable_caching or full <= seq.num_cached_blocks:
            return
        hashes = self._block_hashes(seq, full)
        for k in range(seq.num_cached_blocks, full):
            self.allocator.cache(seq.block_table[k], hashes[k])
        seq.num_cached_blocks = full

    def needs_block(self, seq: Sequence) -> bool:
        """Whether `seq`'s next token (the last one sampled, maybe still on the device) falls
        past its last block."""
        return self._missing(seq, seq.length) > 0

    def append_block(self, seq: Sequence) -> bool:
        """One more block for `seq` (evicting a cached one if need be); False when none is
        free."""
        if not self.allocator.available:
            return False
        seq.block_table += self.allocator.allocate(1)
        return True

    def free(self, seq: Sequence) -> None:
        """`seq` lets go of its blocks (shared ones stay with their other holders); none of its
        tokens is in its own cache any more (its cached blocks may still be found again)."""
        self.allocator.free(seq.block_table)
        seq.cached = seq.num_cached_blocks = 0

    def computing_prefix(self, seq: Sequence, prefilling: list[Sequence]) -> bool:
        """Whether the first block `seq` would compute is one a prefilling sequence is
        computing now (same chained key): `seq` should wait and find it cached a step later,
        so a cold burst of one system prompt computes it once, not once per request."""
        if not self.enable_caching or seq.block_table:
            return False
        first = len(self._cache_hits(seq))
        if first >= (len(seq.ids) - 1) // self.block_size:
            return False  # nothing more of its prompt could come from the cache
        wanted = self._block_hashes(seq, first + 1)[first]
        return any(wanted in other.block_hashes[other.num_cached_blocks:]
                   for other in prefilling)

    def reset_prefix_cache(self) -> None:
        self.allocator.reset_cache()

    def _cache_hits(self, seq: Sequence) -> list[int]:
        """The blocks of `seq`'s longest cached prefix (none if `seq` holds blocks already). The
        last token is always left to compute: its logits give the next token."""
        if not self.enable_caching or seq.block_table:
            return []
        hits = []
        for block_hash in self._block_hashes(seq, (len(seq.ids) - 1) // self.block_size):
            block_id = self.allocator.cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _block_hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """`seq`'s first `count` full blocks' keys, computed once (its ids only grow)."""
        hashes, size = seq.block_hashes, self.block_size
        assert count * size <= len(seq.ids), "only full blocks have keys"
        while len(hashes) < count:
            k = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if k else None,
                                            seq.ids[k * size:(k + 1) * size]))
        return hashes[:count]

    def _missing(self, seq: Sequence, tokens: int) -> int:
        return self.blocks_for(tokens) - len(seq.block_table)
