"""The engine's KV cache: a fixed set of rows, each holding one sequence from slot 0 on.

Row r keeps its sequence's keys and values at slots [0, lengths[r]); slot i holds the token at
rotary position i. Nothing is padded inside a row, so keys computed for a prefix at positions
0.. are valid in any row (the prefix cache copies them in), and a sequence that leaves moves no
other row's slots (at most the last row is copied into the hole, see `move`).
"""

from __future__ import annotations

import torch

from kaki.config import ModelConfig
from kaki.model import attention_mask


def kv_cache_bytes(cfg: ModelConfig, rows: int, capacity: int, dtype: torch.dtype) -> int:
    """Bytes a RowCache of `rows` rows holding `capacity` tokens each allocates (keys and values,
    with the spare slot per row)."""
    return rows * (capacity + 1) * RowCache.bytes_per_token(cfg, dtype)


class RowCache:
    """Keys and values (L, rows, KV, capacity + 1, D). A forward pass runs on the rows [lo, hi)
    chosen by `use`, and implements `kaki.model.AttentionCache` for them: each row's new tokens
    (the columns where `valid` is True, in order) go to its slots lengths[r], lengths[r] + 1, ...;
    padding columns are written to the spare last slot, which no query ever reads."""

    def __init__(self, cfg: ModelConfig, rows: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (cfg.num_hidden_layers, rows, cfg.num_key_value_heads, capacity + 1, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * rows
        self.lo, self.hi = 0, 0
        # Set by begin for one forward pass: where the new keys go (one slot offset for every row,
        # or (rows, slots) indices), how many real tokens each row adds, and how many slots to read.
        self._write: int | tuple[torch.Tensor, torch.Tensor] | None = None
        self._counts: list[int] = []
        self._keys = 0

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3] - 1

    @staticmethod
    def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem

    # ------------------------------------------------------------------------ rows

    def use(self, lo: int, hi: int) -> None:
        """The rows the next forward pass runs on."""
        self.lo, self.hi = lo, hi

    def reserve(self, rows: int, capacity: int) -> None:
        """Grow to at least `rows` rows of `capacity` slots, keeping what the rows hold."""
        if rows <= self.rows and capacity <= self.capacity:
            return
        L, R, KV, C, D = self.k.shape
        rows, capacity = max(rows, R), max(capacity, C - 1)
        k = self.k.new_zeros(L, rows, KV, capacity + 1, D)
        v = self.v.new_zeros(L, rows, KV, capacity + 1, D)
        used = max(self.lengths, default=0)
        k[:, :R, :, :used] = self.k[:, :, :, :used]
        v[:, :R, :, :used] = self.v[:, :, :, :used]
        self.k, self.v = k, v
        self.lengths += [0] * (rows - R)

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s sequence moves to row `dst` (whose own is gone); `src` is left empty."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst], self.lengths[src] = n, 0

    def trim(self, row: int, n: int) -> None:
        """Drop row `row`'s last `n` tokens (drafts a speculative step rejected): the slots stay
        as they are, but no query reads past a row's length and the next pass writes over them."""
        if not 0 <= n <= self.lengths[row]:
            raise ValueError(f"row {row} holds {self.lengths[row]} tokens; cannot drop {n}")
        self.lengths[row] -= n

    def read(self, row: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of row `row`'s slots [start, start + n): (L, KV, n, D) each."""
        return self.k[:, row, :, start:start + n], self.v[:, row, :, start:start + n]

    def write(self, row: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Fill row `row`'s slots [start, start + n) with k, v (L, KV, n, D); the row then holds
        start + n tokens."""
        n = k.shape[2]
        self.k[:, row, :, start:start + n] = k
        self.v[:, row, :, start:start + n] = v
        self.lengths[row] = start + n

    # ------------------------------------------------------------------------ AttentionCache

    def begin(self, input_ids, positions, valid):
        B, S = input_ids.shape
        if B != self.hi - self.lo:
            raise ValueError(f"{B} rows of input for cache rows [{self.lo}, {self.hi})")
        device = input_ids.device
        starts = self.lengths[self.lo:self.hi]
        counts = [S] * B if valid is None else valid.sum(1).tolist()
        ends = [s + n for s, n in zip(starts, counts)]
        if max(ends) > self.capacity:
            raise ValueError(f"KV cache rows hold {self.capacity} tokens; {max(ends)} requested")
        self._counts, self._keys = counts, max(ends)
        if valid is None and min(starts) == max(starts):
            # Every row goes on from the same slot: a plain slice write, and the masks a single
            # sequence needs (none for a prefill from slot 0 or a one-token step).
            start = starts[0]
            self._write = start
            if positions is None:
                positions = torch.arange(start, start + S, device=device).expand(B, S)
            if start == 0:
                return positions, None, S > 1
            if S == 1:
                return positions, None, False
            return positions, attention_mask(B, S, start, None, device), False
        start_t = torch.tensor(starts, device=device)[:, None]  # (B, 1)
        if valid is None:
            slots = start_t + torch.arange(S, device=device)  # (B, S): slot == rotary position
            query_slot, write_slot = slots, slots
        else:
            slots = start_t + valid.long().cumsum(-1) - 1
            # Padding queries see slot 0 only (their outputs are never read, but SDPA returns NaN
            # for a query that sees nothing); padding keys go to the spare slot.
            query_slot = torch.where(valid, slots, 0)
            write_slot = torch.where(valid, slots, self.capacity)
        if positions is None:
            positions = slots.clamp(min=0)
        # A query sees every slot of its row up to its own.
        mask = torch.arange(self._keys, device=device)[None, None, :] <= query_slot[:, :, None]  # (B, S, T)
        rows = torch.arange(self.lo, self.hi, device=device)[:, None]  # (B, 1)
        self._write = (rows, write_slot)
        return positions, mask[:, None], False

    def update(self, layer, k, v):
        T = self._keys
        if isinstance(self._write, int):
            start, S = self._write, k.shape[2]
            self.k[layer, self.lo:self.hi, :, start:start + S] = k
            self.v[layer, self.lo:self.hi, :, start:start + S] = v
        else:
            rows, slots = self._write
            # rows (B, 1) and slots (B, S) index dims 0 and 2: the selection is (B, S, KV, D).
            self.k[layer][rows, :, slots] = k.transpose(1, 2)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)
        return self.k[layer, self.lo:self.hi, :, :T], self.v[layer, self.lo:self.hi, :, :T]

    def end(self) -> None:
        for b, n in enumerate(self._counts):
            self.lengths[self.lo + b] += n
        self._write = None
