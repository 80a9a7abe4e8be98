"""`kaki convert`: a Persimmon model between Adept's Megatron release layout and transformers'.

Reading never holds the weights: a release's .pt is mmapped, safetensors are opened per tensor.
Writing a transformers directory streams: each tensor is read, cast, written and dropped, so peak
memory is about one tensor. Writing a release goes through torch.save, which needs the whole
`model` dict at once: tensors that pass through unchanged stay mmapped from the source, and each
cast or trimmed one is parked in a scratch file and mmapped back, so peak memory is again about
one tensor (the price is writing the converted tensors to disk twice).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
from pathlib import Path

import sentencepiece as spm
import torch
from tqdm import tqdm

from kaki.adept import keys
from kaki.adept.bundle import Bundle, tokenizer_files
from kaki.adept.release import EOD_PIECE, TRACKER, VOCAB_MODEL, VOCAB_TEXT, is_release_dir, read_release
from kaki.adept.unpickle import save_checkpoint_file
from kaki.adept.vocab_trim import VOCAB_MAP_FILE, read_vocab_map, vocab_map_json
from kaki.checkpoint import (DTYPES, MAX_SHARD_BYTES, TensorSource, renamed_sources, tensor_sources, validate,
                             write_atomically, write_files)
from kaki.config import read_config
from kaki.errors import CheckpointError, KakiError
from kaki.loading import resolve_model_path
from kaki.model import CausalLM
from kaki.tokenizer import Tokenizer
from kaki.tp.shard import rank_slices


def _bar(total: int, progress: bool):
    return tqdm(total=total, desc="converting", unit="tensor", disable=not progress)


# ----------------------------------------------------------------------------- reading

def read_source(src: str | Path) -> Bundle:
    """A release directory or a transformers Persimmon directory."""
    d = resolve_model_path(src)
    if is_release_dir(d):
        return read_release(d)
    return read_transformers(d)


def read_transformers(d: Path) -> Bundle:
    cfg = read_config(d)
    if cfg.model_type != "persimmon":
        raise KakiError(f"{d} holds a {cfg.model_type} model; kaki convert handles Persimmon checkpoints")
    sources = renamed_sources(cfg, tensor_sources(d))
    spm_file = d / "tokenizer.model"
    tok = Tokenizer.from_dir(d, cfg)
    vocab_map, original = None, None
    if (d / VOCAB_MAP_FILE).is_file():
        vocab_map, original = read_vocab_map((d / VOCAB_MAP_FILE).read_text())
    return Bundle(cfg=cfg, sources=sources, spm=spm_file.read_bytes() if spm_file.is_file() else None,
                  bos_id=tok.bos_id, eos_ids=list(tok.eos_ids), pad_id=tok.pad_id, add_bos=tok.add_bos,
                  origin=str(d), tokenizer_dir=d, vocab_map=vocab_map, original_vocab_size=original)


# ----------------------------------------------------------------------------- shared

def _target_dtype(src: TensorSource, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and src.dtype.is_floating_point else src.dtype


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` in `dtype` (floating tensors only) and contiguous; `t` itself when it already is."""
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def _materialize(src: TensorSource, dtype: torch.dtype | None) -> torch.Tensor:
    return _cast(src.load(), dtype)


def check(bundle: Bundle) -> None:
    """Every tensor the config implies, with its shape, before a byte is written."""
    with torch.device("meta"):
        model = CausalLM(bundle.cfg)
    validate(model, bundle.sources, bundle.origin)


def _stored_dtype(bundle: Bundle, dtype: torch.dtype | None) -> torch.dtype:
    return dtype or bundle.sources["model.embed_tokens.weight"].dtype


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


# ----------------------------------------------------------------------------- transformers output

_ST_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def _write_bytes(f, t: torch.Tensor) -> None:
    """A CPU tensor's raw bytes, written straight from its memory (no numpy, no extra copy)."""
    n = t.numel() * t.element_size()
    if n:
        f.write(memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())))


def write_safetensors(path: Path, plan: list[tuple[str, TensorSource, torch.dtype]], bar=None) -> None:
    """One safetensors file written tensor by tensor: the header is known from shapes alone, then
    each tensor is read, cast, written and dropped."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, src, dtype in plan:
        n = _nbytes(src.shape, dtype)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(src.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # tensor data 8-byte aligned, as safetensors itself writes
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, src, dtype in plan:
            t = _materialize(src, dtype)
            if tuple(t.shape) != src.shape:
                raise CheckpointError(f"{name} from {src.origin} has shape {list(t.shape)}, not {list(src.shape)}")
            _write_bytes(f, t)
            del t
            if bar is not None:
                bar.update(1)


def _shards(plan, max_bytes: int):
    shards, current, size = [], [], 0
    for item in plan:
        n = _nbytes(item[1].shape, item[2])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    shards.append(current)
    return shards


def write_transformers(bundle: Bundle, out: str | Path, dtype: torch.dtype | None = None,
                       progress: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """A transformers Persimmon directory (safetensors, config.json, tokenizer files) that both
    kaki and PersimmonForCausalLM.from_pretrained load."""
    check(bundle)
    plan = [(name, src, _target_dtype(src, dtype)) for name, src in bundle.sources.items()]
    stored = _stored_dtype(bundle, dtype)
    cfg = bundle.cfg.replace(torch_dtype=str(stored).replace("torch.", ""))

    def write(tmp: Path) -> None:
        shards = _shards(plan, max_shard_bytes)
        with _bar(len(plan), progress) as bar:
            if len(shards) == 1:
                write_safetensors(tmp / "model.safetensors", shards[0], bar)
            else:
                weight_map = {}
                for i, shard in enumerate(shards, 1):
                    name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                    write_safetensors(tmp / name, shard, bar)
                    weight_map.update({n: name for n, _, _ in shard})
                total = sum(_nbytes(s.shape, d) for _, s, d in plan)
                (tmp / "model.safetensors.index.json").write_text(
                    json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        write_files(tmp, tokenizer_files(bundle))
        if bundle.vocab_map is not None:
            (tmp / VOCAB_MAP_FILE).write_text(vocab_map_json(bundle))

    return write_atomically(out, write)


# ----------------------------------------------------------------------------- release output

def megatron_args(bundle: Bundle, dtype: torch.dtype, tensor_parallel: int = 1) -> argparse.Namespace:
    """The args Megatron reads back (reference §2.4): the source release's own, with what changed
    updated; built from the config for a transformers source."""
    cfg = bundle.cfg
    flags = {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16}
    if bundle.args is not None:
        args = argparse.Namespace(**vars(bundle.args))
        args.tensor_model_parallel_size = tensor_parallel
        if getattr(args, "padded_vocab_size", cfg.vocab_size) != cfg.vocab_size:
            args.padded_vocab_size = cfg.vocab_size
        if any(getattr(args, k, None) not in (None, v) for k, v in flags.items()):
            for k, v in flags.items():
                setattr(args, k, v)
            if isinstance(getattr(args, "params_dtype", None), torch.dtype):
                args.params_dtype = dtype
        return args
    if cfg.hidden_act not in ("relu2", "gelu"):
        raise KakiError(f"Megatron's GPT has squared-ReLU or gelu MLPs, not {cfg.hidden_act!r}")
    if cfg.rope_scaling:
        raise KakiError("Megatron's GPT has no rope scaling; this model cannot be written as a release")
    return argparse.Namespace(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, kv_channels=cfg.head_dim,
        seq_length=cfg.max_position_embeddings, max_position_embeddings=cfg.max_position_embeddings,
        pos_emb="rotary", rotary_pct=cfg.partial_rotary_factor, rotary_emb_base=cfg.rope_theta,
        layernorm_epsilon=cfg.layer_norm_eps, untie_embeddings=not cfg.tie_word_embeddings,
        sq_relu=cfg.hidden_act == "relu2", bias_gelu_fusion=False,
        qk_layernorm="weights_per_layer" if cfg.qk_layernorm else None,
        tokenizer_type="SentencePiece", padded_vocab_size=cfg.vocab_size, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=1, params_dtype=dtype, **flags)


def _inv_freq(bundle: Bundle, layer: int, dtype: torch.dtype) -> torch.Tensor:
    """The source's buffer when it had one (byte-equal round trip), else flash-attn's formula, held
    in the weights' dtype as Megatron's Float16Module holds buffers."""
    src = bundle.inv_freq.get(layer)
    if src is not None:
        return _materialize(src, dtype)
    rot = bundle.cfg.rotary_ndims
    inv = 1.0 / (bundle.cfg.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    return inv.to(dtype)


def _file_backed(src: TensorSource, dtype: torch.dtype | None, scratch: Path) -> torch.Tensor:
    """The tensor, cast, backed by a file rather than by memory: the source's own mmapped storage
    when it passes through whole, else a copy written to `scratch` and mmapped back."""
    raw = src.load()
    t = _cast(raw, dtype)
    storage = t.untyped_storage()
    whole = storage.nbytes() == t.numel() * t.element_size()  # torch.save writes a view's whole storage
    if (whole and storage.data_ptr() == raw.untyped_storage().data_ptr()) or t.numel() == 0:
        return t
    path = scratch / f"{sum(1 for _ in scratch.iterdir())}.bin"
    with open(path, "wb") as f:
        _write_bytes(f, t)
    shape, target = t.shape, t.dtype
    del t, raw
    return torch.from_file(str(path), shared=False, size=shape.numel(), dtype=target).view(shape)


def _vocab_text(spm_bytes: bytes) -> str:
    """adept_vocab.vocab: `piece<TAB>score` per line, as spm_train writes it for browsing."""
    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    return "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))


def write_release(bundle: Bundle, out: str | Path, dtype: torch.dtype | None = None,
                  progress: bool = False, iteration: int | None = None, tensor_parallel: int = 1) -> Path:
    """Adept's release layout, loadable by kaki and by adept-inference's Megatron; tensor_parallel
    N > 1 writes Megatron's split into mp_rank_00 .. mp_rank_{N-1} (kaki.tp.shard.rank_slices)."""
    check(bundle)
    ranks = rank_slices(bundle.sources, bundle.cfg, tensor_parallel)
    if bundle.spm is None:
        raise KakiError(f"a release needs a sentencepiece tokenizer; {bundle.origin} has no tokenizer.model")
    sp = spm.SentencePieceProcessor(model_proto=bundle.spm)
    eod = sp.piece_to_id(EOD_PIECE)
    if sp.id_to_piece(eod) != EOD_PIECE and sp.eos_id() < 0:
        raise KakiError(f"the tokenizer has no {EOD_PIECE} or eos piece, which Adept's code uses as end of text")
    it = iteration if iteration is not None else (bundle.iteration or 1)
    if it <= 0:
        raise KakiError(f"--iteration must be positive (Megatron refuses {it})")
    stored = _stored_dtype(bundle, dtype)
    args = megatron_args(bundle, stored, tensor_parallel)

    def write(tmp: Path) -> None:
        scratch = tmp / ".scratch"
        with _bar(len(bundle.sources) * len(ranks), progress) as bar:
            for rank, sources in enumerate(ranks):
                scratch.mkdir()
                flat = {}
                for name, src in sources.items():
                    flat[keys.to_megatron(name)] = _file_backed(src, dtype, scratch)
                    bar.update(1)
                for layer in range(bundle.cfg.num_hidden_layers):
                    flat[keys.INV_FREQ_NAME.format(n=layer)] = _inv_freq(bundle, layer, stored)
                state = {"args": args, "checkpoint_version": bundle.checkpoint_version or 3.0,
                         "iteration": it, "model": keys.nest(flat)}
                folder = tmp / f"iter_{it:07d}" / f"mp_rank_{rank:02d}"
                folder.mkdir(parents=True)
                save_checkpoint_file(state, folder / "model_optim_rng.pt")
                del state, flat
                shutil.rmtree(scratch)
        (tmp / TRACKER).write_text(f"{it}\n")
        (tmp / VOCAB_MODEL).write_bytes(bundle.spm)
        if bundle.vocab_file is not None:
            shutil.copyfile(bundle.vocab_file, tmp / VOCAB_TEXT)
        else:
            (tmp / VOCAB_TEXT).write_text(_vocab_text(bundle.spm))
        if bundle.vocab_map is not None:
            (tmp / VOCAB_MAP_FILE).write_text(vocab_map_json(bundle))

    return write_atomically(out, write)


def embedding_bytes_saved(before: Bundle, after: Bundle, dtype: torch.dtype | None) -> int:
    """Bytes the trimmed embedding matrices no longer take, in the output dtype."""
    saved = 0
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in before.sources:
            a, b = before.sources[name], after.sources[name]
            saved += _nbytes(a.shape, _target_dtype(a, dtype)) - _nbytes(b.shape, _target_dtype(b, dtype))
    return saved


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise KakiError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return DTYPES[name]
