"""Loading a transformers model directory: find it (a path, or a hub id already in the local
Hugging Face cache), build the model on the meta device and stream its weights in, and read its
generation defaults. `kaki.load` (kaki.llm) puts these together with the tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from tqdm import tqdm

from kaki.checkpoint import assign_weights, renamed_sources, tensor_sources, validate
from kaki.config import ModelConfig, read_json
from kaki.errors import CheckpointError
from kaki.model import CausalLM
from kaki.quant.load import prepare
from kaki.tp.group import TensorParallel
from kaki.tp.shard import local_config, shard_sources


def resolve_model_path(path_or_id: str | os.PathLike) -> Path:
    """A local directory, or a hub id found in the local Hugging Face cache (never downloaded)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; --model takes the model's directory")
    text = str(path_or_id)
    # `owner/name` may be a hub id, unless its first part is a local folder (`runs/nothere`):
    # then it is a path, and the answer is that it does not exist, not how to download it.
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not p.parent.is_dir():
        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception:
            raise CheckpointError(
                f"{text} is neither a directory here nor a model in the local Hugging Face cache; if it is "
                f"a hub id, kaki never downloads at run time: fetch it once with `hf download {text}` (or "
                f"`huggingface-cli download {text}`) and run again") from None
    raise CheckpointError(f"model directory {p} does not exist")


def build_model(cfg: ModelConfig, sources: dict, dtype: torch.dtype, device: torch.device,
                where: str, progress: bool = False, quantize=None, keep_plain: bool = False,
                tp: TensorParallel | None = None) -> CausalLM:
    """quantize (a QuantSpec) swaps in quantized linear layers that take their weights while
    loading (kaki.quant.load); a checkpoint stored quantized gets them whether asked or not.
    keep_plain leaves quantized weights unpacked (for saving them right away).
    tp: build this rank's part of a tensor-parallel model, reading only its slices of `sources`
    (which hold the whole model's tensors); quantization then quantizes the slices."""
    place = None
    if tp is not None:
        cfg, sources = local_config(cfg, tp), shard_sources(sources, cfg, tp)
    if quantize is not None or "quantization_config" in cfg.extra:
        model, sources, place = prepare(cfg, sources, quantize, where, keep_plain, tp=tp)
    else:
        with torch.device("meta"):
            model = CausalLM(cfg, tp)
        validate(model, sources, where)
    bar = None
    if progress:
        bar = lambda it: tqdm(it, desc="loading", unit="tensor", leave=False)  # noqa: E731
    assign_weights(model, sources, dtype, device, bar, place=place)
    if place is not None:
        place.finish()
    return model.eval()


def load_model(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               progress: bool = False, quantize=None, keep_plain: bool = False,
               tp: TensorParallel | None = None) -> CausalLM:
    sources = renamed_sources(cfg, tensor_sources(model_dir))
    if cfg.tie_word_embeddings and "lm_head.weight" in sources:
        cfg = cfg.replace(tie_word_embeddings=False)  # a distinct head is stored: use it, as transformers does
    return build_model(cfg, sources, dtype, device, str(model_dir), progress, quantize, keep_plain, tp)


# generation_config.json keys that map onto SamplingParams.
_GEN_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
             "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_new_tokens"}


def generation_defaults(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return {}
    raw = read_json(path, "restore it from the original checkpoint or delete it")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object; restore it from the original checkpoint or delete it")
    out = {dst: raw[src] for src, dst in _GEN_KEYS.items() if raw.get(src) is not None}
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0  # transformers ignores temperature unless do_sample
    elif raw.get("do_sample") and "temperature" not in out:
        out["temperature"] = 1.0
    return out
