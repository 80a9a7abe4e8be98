"""Adept's Persimmon-8B release: a Megatron checkpoint directory, read with no Megatron code.

    8b_chat_model_release/
      latest_checkpointed_iteration.txt      "1251": which iteration folder holds the weights
      adept_vocab.model                      sentencepiece tokenizer (+ adept_vocab.vocab, unused)
      iter_0001251/mp_rank_00/model_optim_rng.pt   {"model", "args", "iteration", ...}

The config comes from the stored Megatron `args`, the weights from `model` (names per
kaki.adept.keys), the tokenizer from adept_vocab.model with `|ENDOFTEXT|` as BOS, EOS and pad.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch

from kaki.adept.bundle import Bundle, tokenizer_files
from kaki.adept.keys import INV_FREQ, TreeTooLarge, flatten, to_kaki
from kaki.adept.unpickle import load_checkpoint_file, plain
from kaki.adept.vocab_trim import VOCAB_MAP_FILE, read_vocab_map
from kaki.checkpoint import TensorSource
from kaki.config import ModelConfig, check_value
from kaki.device import pick_device, pick_dtype
from kaki.errors import CheckpointError
from kaki.loading import build_model
from kaki.model import CausalLM
from kaki.tokenizer import Tokenizer
from kaki.tp.group import TensorParallel
from kaki.tp.shard import join_ranks

TRACKER = "latest_checkpointed_iteration.txt"
VOCAB_MODEL = "adept_vocab.model"
VOCAB_TEXT = "adept_vocab.vocab"
CHECKPOINT_FILE = "model_optim_rng.pt"
EOD_PIECE = "|ENDOFTEXT|"  # Adept's end-of-document piece: the server's EOD, BOS and padding
RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def is_release_dir(d: str | Path) -> bool:
    """A Megatron release directory rather than a transformers one (which has config.json)."""
    d = Path(d)
    if (d / "config.json").is_file() or not d.is_dir():
        return False
    return (d / TRACKER).is_file() or (d / VOCAB_MODEL).is_file() or any(_iteration_dirs(d))


def _iteration_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.is_dir() and re.fullmatch(r"iter_\d{7}|release", p.name))


@dataclass
class Layout:
    root: Path
    iteration: int | None  # None for Megatron's "release" tracker value
    checkpoints: list[Path]  # mp_rank_00, mp_rank_01, ...: one file per tensor-parallel rank

    @property
    def checkpoint(self) -> Path:
        return self.checkpoints[0]


def locate(d: Path) -> Layout:
    """Find the one checkpoint file the tracker names; every way that can fail says what is there."""
    tracker = d / TRACKER
    found = _iteration_dirs(d)
    if not tracker.is_file():
        hint = (f"it has {', '.join(found)}: write the iteration to load into it, e.g. "
                f"`echo {int(found[-1][5:])} > {tracker}`" if found and found[-1].startswith("iter_")
                else "re-extract the release tarball (tar -xvf 8b_chat_model_release.tar)")
        raise CheckpointError(f"{d} has no {TRACKER}, which names the iteration folder to load; {hint}")
    text = tracker.read_text().strip()
    if text == "release":  # Megatron's marker for converted checkpoints
        iteration, folder = None, d / "release"
    else:
        try:
            iteration = int(text)
        except ValueError:
            iteration = -1
        if iteration <= 0:
            raise CheckpointError(f"{tracker} holds {text!r}; Megatron expects a positive iteration "
                                  "number (or 'release')")
        folder = d / f"iter_{iteration:07d}"
    if not folder.is_dir():
        there = f"found {', '.join(found)}" if found else "found no iteration folder"
        raise CheckpointError(f"{tracker} names {folder.name}, but {folder} does not exist ({there}); the "
                              "tarball was not fully extracted, or the tracker file names the wrong iteration")
    ranks = sorted(p.name for p in folder.iterdir() if p.is_dir() and RANK_DIR.match(p.name))
    if not ranks:
        raise CheckpointError(f"{folder} has no mp_rank_00 folder; expected {folder}/mp_rank_00/{CHECKPOINT_FILE}")
    if any(RANK_DIR.match(r).group(2) is not None for r in ranks):
        raise CheckpointError(
            f"{folder} holds pipeline-parallel shards ({', '.join(ranks[:4])}...): it was saved with pipeline "
            "parallelism > 1, which kaki does not merge; convert it to pipeline parallel size 1 with "
            "Megatron's checkpoint tool first (tensor-parallel mp_rank_XX folders load as they are)")
    expected = [f"mp_rank_{i:02d}" for i in range(len(ranks))]
    if ranks != expected:
        missing = sorted(set(expected) - set(ranks)) or expected[-1:]
        raise CheckpointError(f"{folder} holds {', '.join(ranks)} but not {', '.join(missing)}: a "
                              "tensor-parallel release needs every rank's folder; extract it again")
    paths = [folder / r / CHECKPOINT_FILE for r in ranks]
    for path in paths:
        if not path.is_file():
            inside = ", ".join(sorted(p.name for p in path.parent.iterdir())) or "nothing"
            raise CheckpointError(f"{path} does not exist ({path.parent} holds {inside}); kaki reads the "
                                  f"{CHECKPOINT_FILE} Megatron writes without the distributed optimizer")
    return Layout(d, iteration, paths)


# ----------------------------------------------------------------------------- config from args

# Megatron arg -> config.json key, and the value Adept's Megatron fork uses when the arg is absent
# (None: the arg is required). Reference adept-inference.md §2.4.
ARG_KEYS: list[tuple[str, str, Any]] = [
    ("hidden_size", "hidden_size", None),
    ("num_layers", "num_hidden_layers", None),
    ("num_attention_heads", "num_attention_heads", None),
    ("ffn_hidden_size", "intermediate_size", "4h"),  # Megatron: 4 x hidden_size
    ("max_position_embeddings", "max_position_embeddings", "seq_length"),
    ("rotary_pct", "partial_rotary_factor", 1.0),
    ("rotary_emb_base", "rope_theta", 25000.0),  # the fork's CLI default
    ("layernorm_epsilon", "layer_norm_eps", 1e-5),  # not stored by Megatron: always the CLI default
]
# qk_layernorm values with one [head_dim] LayerNorm per layer shared by all heads (what transformers'
# Persimmon and kaki implement); identical at tensor parallelism 1.
SHARED_QK_NORM = {"weights_per_layer", "weights_per_tensor_parallel_rank_and_layer"}


def _arg(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = plain(getattr(args, name, None))
    return default if value is None else value


def config_from_args(args: argparse.Namespace, sources: dict[str, TensorSource], eod: int,
                     where: str, ranks: int = 1) -> ModelConfig:
    """ranks: how many tensor-parallel mp_rank_XX files `sources` were joined from."""
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{where} has no Megatron `args` (found {type(args).__name__}); kaki reads the "
                              "model's hyperparameters from them")
    raw: dict[str, Any] = {"model_type": "persimmon", "architectures": ["PersimmonForCausalLM"]}
    # Each value is checked as it is read (messages name the arg as Megatron spells it), so the
    # arithmetic below only ever sees positive integers.
    source, spelling = f"{where}: stored args", {}
    for arg, key, default in ARG_KEYS:
        value = _arg(args, arg)
        if value is None and default == "4h":
            value = 4 * raw["hidden_size"]
        elif value is None and default == "seq_length":
            value, arg = _arg(args, "seq_length"), "seq_length"
            if value is None:
                raise CheckpointError(f"{where}: args has neither max_position_embeddings nor seq_length")
        elif value is None and default is None:
            raise CheckpointError(f"{where}: args lacks {arg}; this is not a complete Megatron GPT checkpoint")
        elif value is None:
            value = default
        check_value(key, value, source, arg)
        raw[key], spelling[key] = value, arg
    heads, hidden = raw["num_attention_heads"], raw["hidden_size"]
    kv_channels = _arg(args, "kv_channels")
    if kv_channels is not None:
        check_value("head_dim", kv_channels, source, "kv_channels")
    if hidden % heads or (kv_channels is not None and kv_channels * heads != hidden):
        raise CheckpointError(f"{where}: kv_channels {kv_channels} x {heads} heads != hidden_size {hidden}; "
                              "kaki's Persimmon needs head_dim = hidden_size / heads")
    if _arg(args, "pipeline_model_parallel_size", 1) != 1:
        raise CheckpointError(f"{where}: args.pipeline_model_parallel_size is "
                              f"{_arg(args, 'pipeline_model_parallel_size')}; kaki loads pipeline parallel size 1 "
                              "only (convert the checkpoint with Megatron first)")
    if _arg(args, "tensor_model_parallel_size", 1) != ranks:
        raise CheckpointError(f"{where}: args.tensor_model_parallel_size is {_arg(args, 'tensor_model_parallel_size')} "
                              f"but the iteration folder holds {ranks} mp_rank_XX folder(s); the release is "
                              "incomplete or its folders were mixed up: extract it again")
    pos_emb = _arg(args, "pos_emb", "rotary")
    if pos_emb != "rotary":
        raise CheckpointError(f"{where}: args.pos_emb is {pos_emb!r}; kaki implements rotary only")
    if _arg(args, "apply_residual_connection_post_layernorm", False):
        raise CheckpointError(f"{where}: args.apply_residual_connection_post_layernorm is set; kaki "
                              "implements the pre-LN residual Persimmon uses")
    # Megatron's activation: fused bias-gelu if set, else squared ReLU if sq_relu, else gelu.
    raw["hidden_act"] = "relu2" if _arg(args, "sq_relu", False) and not _arg(args, "bias_gelu_fusion", False) else "gelu"
    qk = _arg(args, "qk_layernorm", False)
    if qk and qk is not True and (not isinstance(qk, str) or qk not in SHARED_QK_NORM):
        raise CheckpointError(f"{where}: args.qk_layernorm is {qk!r}; kaki implements one q/k LayerNorm "
                              f"per layer ({', '.join(sorted(SHARED_QK_NORM))})")
    raw["qk_layernorm"] = bool(qk)
    embed = sources.get("model.embed_tokens.weight")
    if embed is None or len(embed.shape) != 2:
        found = "none" if embed is None else f"shape {list(embed.shape)}"
        raise CheckpointError(f"{where} has no [vocab, hidden] language_model.embedding.word_embeddings.weight "
                              f"({found})")
    raw["vocab_size"] = embed.shape[0]
    padded = _arg(args, "padded_vocab_size")
    if padded is not None and padded != embed.shape[0]:
        raise CheckpointError(f"{where}: args.padded_vocab_size is {padded} but the embedding has "
                              f"{embed.shape[0]} rows; the weights and args do not belong together")
    raw["tie_word_embeddings"] = "lm_head.weight" not in sources
    if raw["tie_word_embeddings"] and _arg(args, "untie_embeddings", False):
        raise CheckpointError(f"{where}: args.untie_embeddings is set but word_embeddings_for_head.weight "
                              "is missing; the checkpoint is incomplete")
    raw["bos_token_id"] = raw["eos_token_id"] = raw["pad_token_id"] = eod
    raw["torch_dtype"] = str(embed.dtype).replace("torch.", "")
    return ModelConfig.from_dict(raw, source, spelling)


# ----------------------------------------------------------------------------- reading

def _eod_id(spm_bytes: bytes, path: Path) -> int:
    """Adept's server scans the pieces for |ENDOFTEXT| and falls back to sentencepiece's eos."""
    try:
        sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    except Exception as e:
        raise CheckpointError(f"{path} is not a sentencepiece model ({e}); extract it again from the tarball")
    i = sp.piece_to_id(EOD_PIECE)
    if sp.id_to_piece(i) == EOD_PIECE:
        return i
    if sp.eos_id() >= 0:
        return sp.eos_id()
    raise CheckpointError(f"{path} has neither a {EOD_PIECE} piece nor an eos piece; it is not Adept's vocabulary")


def _read_rank_file(path: Path) -> tuple[dict, dict[str, TensorSource], dict[int, TensorSource]]:
    """(the file's dict, its tensors by kaki name, its rotary inv_freq buffers by layer), nothing read."""
    where = str(path)
    raw = load_checkpoint_file(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        keys = ", ".join(map(str, list(raw)[:8])) if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{where} holds {keys}, not Megatron's {{'model', 'args', 'iteration'}} dict")
    version = raw.get("checkpoint_version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, (int, float))):
        raise CheckpointError(f"{where}: checkpoint_version must be a number, not {version!r:.60}; the file is "
                              "damaged: extract it again from the release tarball")
    if version is not None and version < 2.0:
        # Megatron before checkpoint version 2.0 stored query_key_value rows in another order
        # ([3, heads, d] or [heads, d, 3]); kaki reads the head-interleaved layout only.
        raise CheckpointError(f"{where} is a Megatron checkpoint_version {version} file, whose fused qkv "
                              "rows are ordered differently; load and re-save it with Megatron first")
    sources: dict[str, TensorSource] = {}
    inv_freq: dict[int, TensorSource] = {}
    unknown = []
    try:
        tree = flatten(raw["model"])
    except TreeTooLarge as e:
        raise CheckpointError(f"{where}: its model dict is {e}, where Megatron's has 4 levels and a few hundred "
                              "tensors; the file is damaged or hostile: extract it again from the release "
                              "tarball") from None
    for name, t in tree.items():
        if not isinstance(t, torch.Tensor):
            continue  # Megatron keeps _extra_state and the like next to tensors
        src = TensorSource(tuple(t.shape), t.dtype, (lambda t=t: t), where, name=name)
        if m := INV_FREQ.match(name):
            inv_freq[int(m.group(1))] = src
            continue
        key = to_kaki(name)
        if key is None:
            unknown.append(name)
            key = name  # validation lists it as unexpected, with every other problem
        sources[key] = src
    return raw, sources, inv_freq


def read_release(d: str | Path) -> Bundle:
    """Config, tokenizer and (unread, mmapped) weights of a release directory."""
    d = Path(d)
    layout = locate(d)
    vocab = d / VOCAB_MODEL
    if not vocab.is_file():
        raise CheckpointError(f"{d} has no {VOCAB_MODEL} (the sentencepiece tokenizer shipped next to "
                              f"{TRACKER}); re-extract the release tarball")
    spm_bytes = vocab.read_bytes()
    eod = _eod_id(spm_bytes, vocab)
    where = str(layout.checkpoint)
    files = [_read_rank_file(path) for path in layout.checkpoints]
    raw, _, inv_freq = files[0]
    version = raw.get("checkpoint_version")
    sources = files[0][1] if len(files) == 1 else join_ranks([f[1] for f in files], where)
    cfg = config_from_args(raw.get("args"), sources, eod, where, len(files))
    iteration = raw.get("iteration", layout.iteration)
    vocab_map, original = None, None
    if (d / VOCAB_MAP_FILE).is_file():  # written by `kaki convert --trim-vocab`
        vocab_map, original = read_vocab_map((d / VOCAB_MAP_FILE).read_text())
    return Bundle(cfg=cfg, sources=sources, spm=spm_bytes, bos_id=eod, eos_ids=[eod], pad_id=eod,
                  add_bos=False, origin=where, iteration=iteration if isinstance(iteration, int) else None,
                  args=raw.get("args"), checkpoint_version=version, inv_freq=inv_freq,
                  vocab_file=d / VOCAB_TEXT if (d / VOCAB_TEXT).is_file() else None,
                  vocab_map=vocab_map, original_vocab_size=original)


def load_release(d: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "auto",
                 progress: bool = False, tp: TensorParallel | None = None) -> tuple[CausalLM, Tokenizer, dict]:
    """What `kaki.load` needs of a release directory: (model, tokenizer, the tokenizer files
    `LLM.save` writes for it). tp: this rank's part of a tensor-parallel model."""
    bundle = read_release(d)
    dev = pick_device(device)
    dt = pick_dtype(dtype, bundle.cfg, dev)
    try:
        model = build_model(bundle.cfg, bundle.sources, dt, dev, bundle.origin, progress, tp=tp)
    except CheckpointError as e:
        # The shared validation speaks of config.json; a release's config is its stored args.
        message = str(e).replace("Check that config.json belongs", "Check that the stored args belong")
        raise CheckpointError(message.replace("config.json", "stored args")) from None
    return model, bundle.tokenizer(), tokenizer_files(bundle)
