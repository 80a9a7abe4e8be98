"""Saving a model as a transformers directory (safetensors, config.json, tokenizer files) that
kaki and transformers' from_pretrained both load, written atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from kaki.checkpoint import DTYPES, save_weights, state_for_checkpoint, write_atomically, write_files
from kaki.config import ModelConfig
from kaki.model import CausalLM
from kaki.quant import exact_keys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "added_tokens.json")


def save_model_dir(model: CausalLM, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                   dtype: str | None = None, extra_files: dict[str, str | bytes | Path] | None = None,
                   config: ModelConfig | None = None, rename_key=None) -> Path:
    """config: what config.json says (default model.config); rename_key: a last rename of each
    weight's checkpoint name (a classification head's, kaki.heads)."""
    target = DTYPES[dtype] if dtype else None
    cfg = config or model.config

    def write(tmp: Path) -> None:
        state = state_for_checkpoint(model)
        if rename_key is not None:
            state = {rename_key(k): v for k, v in state.items()}
        if target is not None:
            keep = exact_keys(model)  # quantization scales are part of the format, never recast
            state = {k: v.to(target) if v.is_floating_point() and k not in keep else v for k, v in state.items()}
        save_weights(state, tmp)
        stored = next(iter(state.values())).dtype
        config = cfg.replace(torch_dtype=str(stored).replace("torch.", "")).to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    shutil.copyfile(src, tmp / name)
        write_files(tmp, extra_files or {})

    return write_atomically(out_dir, write)
