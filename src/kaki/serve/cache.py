"""The server's KV cache: a fixed pool of rows that sequences join and leave between steps.

It has the attributes `CausalLM.forward` reads from a `kaki.model.KVCache` (`k`, `v`, `valid`,
`length`, `capacity`, `padded`), so the model runs on it unchanged. What it adds is continuous
batching without copying the whole cache at every join and leave:

- Storage is allocated once, (L, max_rows, KV, max_len, D), at start-up (where its size is checked
  against free memory); `k`/`v`/`valid` are views of the first `rows` rows, so a decode step only
  computes on the sequences that are running.
- All rows share one slot timeline (`length` slots are written); a row's own tokens are always the
  contiguous slots [first, length), with `valid` False before them. Rotary positions are baked into
  the keys when they are written, so where a row sits on the timeline does not change its math.
- A newcomer is prefilled straight into a free row, right-aligned so its last prompt token lands in
  slot `length - 1` (the slots before it are masked out). Only when its prompt is longer than the
  timeline do the running rows move right to make room.
- A leaving row is replaced by the last row (one row copied); the caller re-indexes that sequence.
- When the timeline reaches `max_len`, the slots no running row uses any more are dropped from
  the left. Every row's span is at most its own token count, so there is always room again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kaki.config import ModelConfig


def kv_cache_bytes(cfg: ModelConfig, rows: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of keys, values and the validity mask for `rows` sequences of `max_len` tokens."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem + 1
    return rows * max_len * per_slot


@dataclass
class RowsView:
    """The slice of a `SlotCache` that a group of newcomers is prefilled into: rows [lo, hi),
    written from slot `length` on. It has what `CausalLM.forward` needs of a cache."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    length: int
    padded: bool

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


class SlotCache:
    def __init__(self, cfg: ModelConfig, max_rows: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        shape = (cfg.num_hidden_layers, max_rows, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self._k = torch.zeros(shape, dtype=dtype, device=device)
        self._v = torch.zeros(shape, dtype=dtype, device=device)
        self._valid = torch.zeros(max_rows, max_len, dtype=torch.bool, device=device)
        self.rows = 0
        self.length = 0
        self.padded = False  # some running row has masked slots before its first token

    # What CausalLM.forward reads: views of the running rows.
    @property
    def k(self) -> torch.Tensor:
        return self._k[:, :self.rows]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, :self.rows]

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:self.rows]

    @property
    def capacity(self) -> int:
        return self._k.shape[3]

    @property
    def max_rows(self) -> int:
        return self._k.shape[1]

    @property
    def free_rows(self) -> int:
        return self.max_rows - self.rows

    def first_slot(self) -> int:
        """The earliest slot any running row still uses (`length` when there are no rows)."""
        if self.rows == 0:
            return self.length
        used = self.valid[:, :self.length].any(0)  # (T,)
        return int(used.to(torch.int8).argmax()) if bool(used.any()) else self.length

    def shift(self, delta: int) -> None:
        """Move the running rows' used slots `delta` slots right (or left when negative)."""
        if delta == 0:
            return
        first = self.first_slot()
        if first + delta < 0 or self.length + delta > self.capacity:
            raise ValueError(f"cannot shift slots [{first}, {self.length}) by {delta}")
        src = slice(first, self.length)
        dst = slice(first + delta, self.length + delta)
        r = self.rows
        # clone: source and destination overlap.
        self._k[:, :r, :, dst] = self._k[:, :r, :, src].clone()
        self._v[:, :r, :, dst] = self._v[:, :r, :, src].clone()
        self._valid[:r, dst] = self._valid[:r, src].clone()
        if delta > 0:
            self._valid[:r, first:first + delta] = False
            self.padded = True
        else:
            self._valid[:r, self.length + delta:self.length] = False
        self.length += delta

    def compact(self) -> None:
        """Drop the slots no running row uses any more (before the timeline runs out)."""
        self.shift(-self.first_slot())

    def reserve(self, n: int, prompt_len: int) -> RowsView:
        """Rows for `n` newcomers whose (left-padded) prompts are `prompt_len` slots, aligned to
        end at the current `length` (moving the running rows right if the prompts are longer).
        Returns the view to prefill them into; `rows` grows by `n`."""
        if n > self.free_rows:
            raise ValueError(f"{n} rows asked for, {self.free_rows} free")
        if self.rows == 0:
            self.length, self.padded = prompt_len, False
        elif prompt_len > self.length:
            self.shift(prompt_len - self.length)
        lo, hi = self.rows, self.rows + n
        start = self.length - prompt_len
        self._valid[lo:hi] = False
        if start > 0:
            self.padded = True
        self.rows = hi
        return RowsView(self._k[:, lo:hi], self._v[:, lo:hi], self._valid[lo:hi], start, start > 0)

    def note_prefill(self, view: RowsView) -> None:
        """After prefilling into `view`: its pads make masks necessary from now on."""
        self.padded = self.padded or view.padded

    def remove(self, row: int) -> int | None:
        """Free `row`; the last row moves into its place. Returns the index that moved (the old
        last row), or None when nothing moved."""
        last = self.rows - 1
        moved = None
        if row != last:
            t = self.length
            self._k[:, row, :, :t] = self._k[:, last, :, :t]
            self._v[:, row, :, :t] = self._v[:, last, :, :t]
            self._valid[row, :t] = self._valid[last, :t]
            moved = last
        self._valid[last] = False
        self.rows = last
        if self.rows == 0:
            self.length = 0
            self.padded = False
        return moved
