"""Prefix caching: keys and values of token prefixes kept across sequences, exactly.

A prefix is cached in blocks of `block_size` tokens (only full blocks). A block is known by its
parent block and its own token ids, so a block stands for the whole prefix up to its end and a
lookup walks a prompt block by block from the first (as vLLM's automatic prefix caching chains
block hashes; here the key is (parent's serial number, token ids), which is exact, not a hash).
Keys carry their rotary position, and block i always holds positions [i * block_size, (i + 1) *
block_size), so a cached prefix is valid in any row of any later batch.

The blocks live in one pool allocated once at its full size, (L, blocks, KV, block_size, D) for
keys and as much for values, so the memory budget is exact. A block is in use while a running
sequence holds it or a cached block extends it; only blocks in use by nobody are evicted, least
recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from kaki.config import ModelConfig
from kaki.engine.kv import RowCache

DEFAULT_BLOCK_SIZE = 16
# What an LLM keeps across generate/stream calls unless told otherwise: a system prompt or a
# conversation's earlier turns are prefilled once. The pool is allocated on first use.
DEFAULT_BUDGET_BYTES = 1 << 30


@dataclass(eq=False)  # identity: blocks are dict keys of the LRU order
class Block:
    index: int  # in the pool
    serial: int  # never reused, so a child's key cannot name a later block that took the index
    parent: "Block | None"
    tokens: tuple[int, ...]
    depth: int  # blocks from the first one to this one, both included
    refs: int = 0  # running sequences holding it
    children: int = 0  # cached blocks that extend it


@dataclass
class PrefixStats:
    hit_tokens: int = 0  # prompt tokens whose keys and values came from the cache
    evictions: int = 0
    stored_blocks: int = 0  # blocks written into the pool


class PrefixCache:
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str, budget_bytes: int,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size < 1 or budget_bytes < 0:
            raise ValueError("block_size must be >= 1 and budget_bytes >= 0")
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.block_size = block_size
        self.block_bytes = block_size * RowCache.bytes_per_token(cfg, dtype)
        self.budget_bytes = budget_bytes
        self.max_blocks = budget_bytes // self.block_bytes
        self._k: torch.Tensor | None = None  # the pool, allocated on the first store
        self._v: torch.Tensor | None = None
        self._table: dict[tuple[int, tuple[int, ...]], Block] = {}
        self._lru: OrderedDict[Block, None] = OrderedDict()  # blocks in use by nobody, oldest first
        self._free: list[int] = []  # pool indices given back by evictions
        self._fresh = 0  # pool indices below this have been handed out
        self._serial = 0
        self.stats = PrefixStats()

    @property
    def blocks(self) -> int:
        return len(self._table)

    @property
    def bytes(self) -> int:
        """Bytes of the blocks cached now (the pool itself is `max_blocks * block_bytes`)."""
        return self.blocks * self.block_bytes

    def counters(self) -> dict:
        return {"prefix_hit_tokens": self.stats.hit_tokens, "prefix_evictions": self.stats.evictions,
                "prefix_blocks": self.blocks, "prefix_bytes": self.bytes,
                "prefix_budget_bytes": self.max_blocks * self.block_bytes}

    # ------------------------------------------------------------------------ lookups

    def match(self, ids: list[int]) -> list[Block]:
        """The cached blocks that `ids` starts with, in order (full blocks only)."""
        out: list[Block] = []
        bs = self.block_size
        for i in range(len(ids) // bs):
            block = self._table.get(self._key(out[-1] if out else None, ids[i * bs:(i + 1) * bs]))
            if block is None:
                break
            out.append(block)
        return out

    def acquire(self, blocks: list[Block]) -> None:
        """A running sequence holds `blocks`: they cannot be evicted until it releases them."""
        for b in blocks:
            b.refs += 1
            self._lru.pop(b, None)

    def release(self, blocks: list[Block]) -> None:
        for b in reversed(blocks):
            b.refs -= 1
            if b.refs == 0 and b.children == 0:
                self._lru[b] = None  # the most recently used

    def load(self, blocks: list[Block], cache: RowCache, row: int) -> int:
        """Copy `blocks` into `row` from slot 0; returns the number of tokens they hold."""
        if not blocks:
            cache.lengths[row] = 0
            return 0
        idx = torch.tensor([b.index for b in blocks], device=self.device)
        L, _, KV, bs, D = self._k.shape
        n = len(blocks) * bs
        # (L, n_blocks, KV, bs, D) -> (L, KV, n_blocks * bs, D): the row's slot order.
        k = self._k.index_select(1, idx).transpose(1, 2).reshape(L, KV, n, D)
        v = self._v.index_select(1, idx).transpose(1, 2).reshape(L, KV, n, D)
        cache.write(row, 0, k, v)
        self.stats.hit_tokens += n
        return n

    # ------------------------------------------------------------------------ storing

    def store(self, parent: Block | None, tokens: list[int], cache: RowCache, row: int) -> Block | None:
        """The block after `parent` holding `tokens`, held for the caller: the cached one, or a new
        one copied from `row`'s slots (which must hold exactly this prefix). None when the pool is
        full of blocks in use."""
        key = self._key(parent, tokens)
        block = self._table.get(key)
        if block is not None:
            self.acquire([block])
            return block
        index = self._allocate()
        if index is None:
            return None
        depth = 1 if parent is None else parent.depth + 1
        k, v = cache.read(row, (depth - 1) * self.block_size, self.block_size)  # (L, KV, bs, D)
        self._k[:, index] = k
        self._v[:, index] = v
        self._serial += 1
        block = Block(index, self._serial, parent, tuple(tokens), depth, refs=1)
        if parent is not None:
            parent.children += 1
            self._lru.pop(parent, None)
        self._table[key] = block
        self.stats.stored_blocks += 1
        return block

    def _key(self, parent: Block | None, tokens: list[int]) -> tuple[int, tuple[int, ...]]:
        return (0 if parent is None else parent.serial, tuple(tokens))

    def _allocate(self) -> int | None:
        if self.max_blocks == 0:
            return None
        if self._k is None:
            L, KV, D = self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim
            shape = (L, self.max_blocks, KV, self.block_size, D)
            # empty, not zeros: only stored blocks are ever read, and on a CPU untouched pages of
            # a large allocation cost no memory until a block lands in them.
            self._k = torch.empty(shape, dtype=self.dtype, device=self.device)
            self._v = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self._free:
            return self._free.pop()
        if self._fresh < self.max_blocks:
            self._fresh += 1
            return self._fresh - 1
        if not self._lru:
            return None
        victim, _ = self._lru.popitem(last=False)
        del self._table[self._key(victim.parent, victim.tokens)]
        self.stats.evictions += 1
        parent = victim.parent
        if parent is not None:
            parent.children -= 1
            if parent.refs == 0 and parent.children == 0:
                # As old as the child just evicted: next in line.
                self._lru[parent] = None
                self._lru.move_to_end(parent, last=False)
        return victim.index
