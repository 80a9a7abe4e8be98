"""A model as the converter sees it, whichever layout it came from: config, weights not yet read,
and a sentencepiece tokenizer."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kaki.checkpoint import TensorSource
from kaki.config import ModelConfig
from kaki.tokenizer import Tokenizer


@dataclass
class Bundle:
    cfg: ModelConfig
    sources: dict[str, TensorSource]  # kaki names; nothing read yet
    spm: bytes | None  # the sentencepiece ModelProto (adept_vocab.model / tokenizer.model)
    bos_id: int | None
    eos_ids: list[int]
    pad_id: int | None
    add_bos: bool
    origin: str  # what was read, for messages
    iteration: int | None = None  # Megatron's training iteration (releases only)
    args: argparse.Namespace | None = None  # Megatron's stored args (releases only)
    checkpoint_version: float | None = None
    # Megatron's per-layer rotary inv_freq buffers, by layer, when the source had them.
    inv_freq: dict[int, TensorSource] = field(default_factory=dict)
    tokenizer_dir: Path | None = None  # a transformers source: its tokenizer files, copied as they are
    vocab_file: Path | None = None  # the release's adept_vocab.vocab (for browsing), copied when unchanged
    # After --trim-vocab: new id -> id in the untrimmed model; None when ids are unchanged.
    vocab_map: list[int] | None = None
    original_vocab_size: int | None = None
    tokenizer_changed: bool = False  # trimming rewrote the tokenizer or renumbered ids
    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes) -> "Bundle":
        return replace(self, **changes)

    def tokenizer(self) -> Tokenizer:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=self.spm)
        n = sp.get_piece_size()
        control = [i for i in range(n) if sp.is_control(i)]
        # Megatron pads the embedding past the last piece; a sampled padding id has no text, so it
        # decodes to nothing, like a control piece (sentencepiece itself would raise).
        padding = range(n, self.cfg.vocab_size)
        return Tokenizer(sp, "sentencepiece", self.bos_id, list(self.eos_ids), self.add_bos, self.pad_id,
                         None, [*control, *padding])
