"""The paged KV cache's bookkeeping: fixed-size blocks, a block table per sequence, prefix caching.

The runner owns the KV tensors ([layers, num_blocks, block_size, kv_heads, head_dim]); this class
only decides which block ids a sequence's positions live in. Position p of a sequence is slot
`p % block_size` of block `table[p // block_size]`.

Prefix caching: a block whose `block_size` positions are all computed is keyed by a hash chained
over every token id from the start of the sequence to the block's end, so two sequences share a
block only when their whole prefixes match. Blocks are reference counted. A cached block nobody
holds stays readable in an LRU list until a fresh block is needed, and is reused on a hit. Only
full blocks are ever shared, and a sequence writes only past its cached prefix, so a shared block
is never written.

Thread-free: the engine loop thread is its only user.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BlockHash = bytes


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent: BlockHash | None = None, start: int = 0
) -> list[BlockHash]:
    """Chained hashes of the full blocks of `token_ids[start:]`, block-aligned at `start`."""
    hashes: list[BlockHash] = []
    full_end = start + (len(token_ids) - start) // block_size * block_size
    for begin in range(start, full_end, block_size):
        digest = hashlib.blake2b(digest_size=16)
        if parent is not None:
            digest.update(parent)
        digest.update(array("q", token_ids[begin : begin + block_size]).tobytes())
        parent = digest.digest()
        hashes.append(parent)
    return hashes


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    hash: BlockHash | None = None  # set once the block is full and registered in the cache


@dataclass
class _SeqBlocks:
    table: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # of table[:len(hashes)], all cached


@dataclass
class PrefixStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens served from cached blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Never-cached free blocks, popped from the end (low ids first, for locality).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        # Cached blocks with no holder, oldest first: evicted from the front when _free is empty.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[BlockHash, int] = {}
        self._seqs: dict[int, _SeqBlocks] = {}
        self.stats = PrefixStats()

    # ---- queries ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence could take now (never-used plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, key: int) -> list[int]:
        return self._seqs[key].table

    def holds(self, key: int) -> bool:
        return key in self._seqs

    # ---- allocation ---------------------------------------------------------------------------

    def allocate_prefix(self, key: int, token_ids: Sequence[int]) -> int:
        """Start sequence `key`: take the longest cached prefix of `token_ids` (full blocks only,
        leaving at least one token to compute) and return how many tokens it covers."""
        if key in self._seqs:
            raise ValueError(f"sequence {key} already holds blocks")
        seq = _SeqBlocks()
        self._seqs[key] = seq
        self.stats.queries += len(token_ids)
        if not self.prefix_caching:
            return 0
        # The last token must be computed to give logits, so a block ending at it is not reused.
        for block_hash in block_hashes(token_ids[: len(token_ids) - 1], self.block_size):
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            self._take(block_id)
            seq.table.append(block_id)
            seq.hashes.append(block_hash)
        cached = len(seq.table) * self.block_size
        self.stats.hits += cached
        return cached

    def can_grow(self, key: int, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) - len(self._seqs[key].table) <= self.num_free_blocks

    def grow(self, key: int, num_tokens: int) -> bool:
        """Make sequence `key`'s table cover `num_tokens` positions; False (and no change) if
        there are not enough free blocks."""
        seq = self._seqs[key]
        missing = self.blocks_needed(num_tokens) - len(seq.table)
        if missing > self.num_free_blocks:
            return False
        for _ in range(missing):
            seq.table.append(self._pop_free())
        return True

    def cache_computed(self, key: int, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the blocks of `key` that `num_computed` tokens have filled, so later
        sequences with the same prefix reuse them."""
        if not self.prefix_caching:
            return
        seq = self._seqs[key]
        full = min(num_computed // self.block_size, len(seq.table))
        if full <= len(seq.hashes):
            return
        start = len(seq.hashes) * self.block_size
        parent = seq.hashes[-1] if seq.hashes else None
        new = block_hashes(token_ids[: full * self.block_size], self.block_size, parent, start)
        for index, block_hash in enumerate(new, start=len(seq.hashes)):
            block = self._blocks[seq.table[index]]
            if block.hash is None and block_hash not in self._cached:
                block.hash = block_hash
                self._cached[block_hash] = block.block_id
            seq.hashes.append(block_hash)

    def free(self, key: int) -> None:
        """Release every block of sequence `key` (finish, cancel or preemption)."""
        seq = self._seqs.pop(key, None)
        if seq is None:
            return
        # Tail blocks first, so under pressure the end of a prefix is evicted before its start.
        for block_id in reversed(seq.table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count:
                continue
            if block.hash is not None:
                self._evictable[block_id] = None
            else:
                self._free.append(block_id)

    # ---- internals ----------------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            self._evictable.pop(block_id)
        block.ref_count += 1

    def _pop_free(self) -> int:
        if self._free:
            block_id = self._free.pop()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self._blocks[block_id]
            assert block.hash is not None
            del self._cached[block.hash]
            block.hash = None
        self._blocks[block_id].ref_count = 1
        return block_id

    def check_invariants(self) -> None:
        """For tests: every block is free, evictable or held, exactly as its counts say."""
        held: dict[int, int] = {}
        for seq in self._seqs.values():
            for block_id in seq.table:
                held[block_id] = held.get(block_id, 0) + 1
        free, evictable = set(self._free), set(self._evictable)
        assert len(free) == len(self._free), "a block is twice in the free list"
        assert not free & evictable, "a block is both free and evictable"
        for block in self._blocks:
            count = held.get(block.block_id, 0)
            assert block.ref_count == count, (
                f"block {block.block_id}: ref {block.ref_count} != {count}"
            )
            if count:
                assert block.block_id not in free and block.block_id not in evictable
            else:
                assert (block.block_id in free) != (block.block_id in evictable)
            if block.block_id in evictable:
                assert block.hash is not None
            if block.hash is not None:
                assert self._cached[block.hash] == block.block_id
        assert len(self._cached) == sum(b.hash is not None for b in self._blocks)
