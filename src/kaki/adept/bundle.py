"""A model as the converter sees it, whichever layout it came from: config, weights not yet read,
and a sentencepiece tokenizer, with the tokenizer files a converted or saved directory gets."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import sentencepiece as spm

from kaki.checkpoint import TensorSource
from kaki.config import ModelConfig
from kaki.errors import CheckpointError
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
        sp = spm.SentencePieceProcessor(model_proto=self.spm)
        n = sp.get_piece_size()
        control = [i for i in range(n) if sp.is_control(i)]
        # Megatron pads the embedding past the last piece; a sampled padding id has no text, so it
        # decodes to nothing, like a control piece (sentencepiece itself would raise).
        padding = range(n, self.cfg.vocab_size)
        return Tokenizer(sp, "sentencepiece", self.bos_id, list(self.eos_ids), self.add_bos, self.pad_id,
                         None, [*control, *padding])


# Tokenizer files of a transformers source, copied as they are while the vocabulary is unchanged.
_KEPT_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "generation_config.json", "added_tokens.json")


def _tokenizer_files(bundle: Bundle) -> dict[str, str | Path]:
    """File name -> text to write, or a source file to copy. Generated files follow Persimmon's hub
    layout (LlamaTokenizer over tokenizer.model) with Adept's |ENDOFTEXT| as BOS, EOS and pad, and
    no BOS prepended by default, as Adept's server does not."""
    src = bundle.tokenizer_dir
    if src is not None and not bundle.tokenizer_changed:
        return {name: src / name for name in _KEPT_TOKENIZER_FILES if (src / name).is_file()}
    if bundle.spm is None:
        return {}
    sp = spm.SentencePieceProcessor(model_proto=bundle.spm)

    def piece(i):
        return sp.id_to_piece(i) if i is not None and 0 <= i < sp.get_piece_size() else None

    eos = bundle.eos_ids[0] if bundle.eos_ids else None
    special = {"bos_token": piece(bundle.bos_id), "eos_token": piece(eos), "unk_token": piece(sp.unk_id()),
               "pad_token": piece(bundle.pad_id)}
    tok_cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": bundle.add_bos, "add_eos_token": False,
               **special, "clean_up_tokenization_spaces": False, "legacy": True,
               "model_max_length": bundle.cfg.max_position_embeddings}
    gen = {"bos_token_id": bundle.bos_id, "eos_token_id": eos, "pad_token_id": bundle.pad_id}
    if src is not None:
        # A trimmed transformers source: its other settings (chat template, sampling defaults)
        # carry over; anything holding token ids is rebuilt above.
        old_tok = _read_json(src / "tokenizer_config.json")
        if old_tok.get("chat_template"):
            tok_cfg["chat_template"] = old_tok["chat_template"]
        gen = {**_read_json(src / "generation_config.json"), **gen}
    return {"tokenizer_config.json": json.dumps(tok_cfg, indent=2) + "\n",
            "special_tokens_map.json": json.dumps({k: v for k, v in special.items() if v}, indent=2) + "\n",
            "generation_config.json": json.dumps(gen, indent=2) + "\n"}


def tokenizer_files(bundle: Bundle) -> dict[str, str | bytes | Path]:
    """Every tokenizer file of a converted directory: tokenizer.model (the release's sentencepiece
    model) and the transformers files around it. `LLM.save` after loading a release writes these too."""
    files: dict[str, str | bytes | Path] = {"tokenizer.model": bundle.spm} if bundle.spm is not None else {}
    return {**files, **_tokenizer_files(bundle)}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
