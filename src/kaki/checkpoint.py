"""Checkpoints in the transformers layout: find, validate, stream into a model, and save back.

Loading never holds two copies of the weights: the model is built on the meta device, each tensor
is read from its file on its own (safetensors are mmapped and reopened per tensor, so the source
pages are released as soon as a converted copy exists; same-dtype tensors stay zero-copy mmaps),
and parameters are assigned, not copied. Every key and shape is checked against the model before
a single weight is read, so a bad checkpoint fails whole and nothing half-loaded is ever used.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kaki.config import ModelConfig, read_json
from kaki.errors import CheckpointError

# Checkpoint name → kaki name, per family, as (checkpoint fragment, kaki fragment); `{n}` is a
# layer number. kaki's names are Persimmon's, so Persimmon needs no entry.
WEIGHT_NAMES: dict[str, list[tuple[str, str]]] = {
    "persimmon": [],
    "gpt_neox": [
        ("gpt_neox.embed_in.", "model.embed_tokens."),
        ("gpt_neox.layers.{n}.attention.", "model.layers.{n}.self_attn."),
        ("gpt_neox.layers.{n}.", "model.layers.{n}."),
        ("gpt_neox.final_layer_norm.", "model.final_layernorm."),
        ("embed_out.", "lm_head."),
    ],
    "llama": [
        ("model.layers.{n}.self_attn.o_proj.", "model.layers.{n}.self_attn.dense."),
        ("model.layers.{n}.mlp.up_proj.", "model.layers.{n}.mlp.dense_h_to_4h."),
        ("model.layers.{n}.mlp.down_proj.", "model.layers.{n}.mlp.dense_4h_to_h."),
        ("model.norm.", "model.final_layernorm."),
    ],
    "gptj": [
        ("transformer.wte.", "model.embed_tokens."),
        ("transformer.h.{n}.ln_1.", "model.layers.{n}.input_layernorm."),
        ("transformer.h.{n}.attn.out_proj.", "model.layers.{n}.self_attn.dense."),
        ("transformer.h.{n}.attn.", "model.layers.{n}.self_attn."),
        ("transformer.h.{n}.mlp.fc_in.", "model.layers.{n}.mlp.dense_h_to_4h."),
        ("transformer.h.{n}.mlp.fc_out.", "model.layers.{n}.mlp.dense_4h_to_h."),
        ("transformer.ln_f.", "model.final_layernorm."),
    ],
}
# Buffers older exports saved that carry no learned weights (recomputed or constant): rotary
# frequencies, and NeoX's and GPT-J's causal-mask buffers (`attention.bias`, `attn.bias`).
IGNORED = re.compile(r"(rotary_emb\.inv_freq|\b(attention|attn)\.(masked_)?bias)$")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _compile(pairs: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern, str]]:
    out = []
    for src, dst in pairs:
        if reverse:
            src, dst = dst, src
        pattern = "^" + re.escape(src).replace(re.escape("{n}"), r"(?P<n>\d+)")
        out.append((re.compile(pattern), dst.replace("{n}", r"\g<n>")))
    return out


def renamer(model_type: str, to_checkpoint: bool = False) -> Callable[[str], str]:
    rules = _compile(WEIGHT_NAMES[model_type], reverse=to_checkpoint)

    def rename(key: str) -> str:
        for pattern, repl in rules:
            new, count = pattern.subn(repl, key, count=1)
            if count:
                return new
        return key

    return rename


# ----------------------------------------------------------------------------- reading tensors

class TensorSource:
    """Where one tensor lives: `shape`, `dtype`, and `load()` to read it; `rows(a, b)` reads
    rows a..b only (quantizing while loading reads big matrices in blocks). `name` is the
    tensor's name in `origin`, for messages. `load_slice(index)`, where the file can (safetensors),
    reads `tensor[index]` alone (a tensor-parallel rank's columns, kaki.tp.shard)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, load: Callable[[], torch.Tensor],
                 origin: str, load_rows: Callable[[int, int], torch.Tensor] | None = None, name: str | None = None,
                 load_slice: Callable[[tuple[slice, ...]], torch.Tensor] | None = None):
        self.shape, self.dtype, self.load, self.origin, self.name = shape, dtype, load, origin, name
        self._rows = load_rows
        self.load_slice = load_slice

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self._rows(a, b) if self._rows is not None else self.load()[a:b]


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files of a transformers directory, honouring a sharded index when present."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = model_dir / index_name
        if index.is_file():
            files = sorted({model_dir / name for name in _shard_names(index)})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are not there: {', '.join(missing)}; "
                                      "the download is incomplete")
            return files
        if (model_dir / single).is_file():
            return [model_dir / single]
    shards = sorted(model_dir.glob("model-*-of-*.safetensors")) or sorted(model_dir.glob("pytorch_model-*-of-*.bin"))
    if shards:
        return shards
    raise CheckpointError(f"{model_dir} has no weights (model.safetensors, model-*-of-*.safetensors "
                          "or pytorch_model*.bin)")


def _shard_names(index: Path) -> set[str]:
    """The files a shard index names, each a path inside the model directory.

    The check is on the name as written, not on where it leads: no absolute path, no `..`. An
    index travels with the checkpoint, so it is the checkpoint author's word, and it may not send
    kaki to /etc/passwd or to another model's weights. Symlinks are not followed for the check
    because they are made on the user's machine, by the user or their tools: the Hugging Face
    cache keeps every file in blobs/ and links it from snapshots/REV/ as ../../blobs/HASH, and
    people link big weight files in from other disks. Downloads from the hub never carry links."""
    raw = read_json(index, "re-download it")
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise CheckpointError(f"{index} is not a valid shard index: its weight_map must map tensor names "
                              "to file names; re-download it")
    names = set(weight_map.values())
    for name in names:
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(f"{index} names {name!r}, a file outside the model directory; an index may "
                                  "only name files in its own directory. Refusing to read it: the checkpoint is "
                                  "damaged or hostile, re-download it from a source you trust")
    return names


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_sources(path: Path) -> dict[str, TensorSource]:
    # Size first: safetensors reports a short file only as an obscure "incomplete metadata".
    _check_safetensors_size(path, os.path.getsize(path))
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
            metas = {k: f.get_slice(k) for k in keys}
            info = {k: (tuple(m.get_shape()), _ST_DTYPES.get(m.get_dtype(), None)) for k, m in metas.items()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download or re-save it")
    del metas

    def loader(key: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            # Reopened per tensor: the mmap of this file closes with it, so only this tensor's
            # source pages are ever resident next to the converted weights.
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(key)
        return load

    def rows_loader(key: str) -> Callable[[int, int], torch.Tensor]:
        def load_rows(a: int, b: int) -> torch.Tensor:
            with safe_open(path, framework="pt") as f:
                return f.get_slice(key)[a:b]
        return load_rows

    def slice_loader(key: str) -> Callable[[tuple[slice, ...]], torch.Tensor]:
        def load_slice(index: tuple[slice, ...]) -> torch.Tensor:
            with safe_open(path, framework="pt") as f:
                return f.get_slice(key)[index]
        return load_slice

    return {k: TensorSource(shape, dtype, loader(k), str(path), rows_loader(k), name=k, load_slice=slice_loader(k))
            for k, (shape, dtype) in info.items()}


def _check_safetensors_size(path: Path, size: int) -> None:
    """A truncated file has a valid header but too few bytes: catch it before reading tensors."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(n, size)))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return  # not a well-formed header at all: safe_open says what is wrong with it
    if 8 + n + end > size:
        raise CheckpointError(f"{path} is truncated: {size} bytes, its header needs {8 + n + end}; "
                              "the download or copy did not finish, fetch it again")


def _torch_bin_sources(path: Path) -> dict[str, TensorSource]:
    try:
        # mmap keeps the pickled storages on disk until each tensor is used.
        state = _torch_load(path, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{path} could not be read ({e}); re-download it") from None
        state = _torch_load(path, mmap=False)  # legacy (non-zip) format: no mmap
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return {k: TensorSource(tuple(t.shape), t.dtype, (lambda t=t: t), str(path), name=k) for k, t in state.items()
            if isinstance(t, torch.Tensor)}


def _torch_load(path: Path, mmap: bool):
    """torch.load with weights_only: a pickle that asks for anything but tensors and plain
    containers is refused (torch's unpickler checks every global before it is used). RuntimeError
    passes through: it is how torch says a legacy file cannot be mmapped."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError:
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        asks = f"its pickle asks for {found.group(1)}, which" if found else "its pickle holds something"
        raise CheckpointError(f"refusing to load {path}: {asks} a weights file never needs (kaki unpickles "
                              "tensors and plain containers only). If you trust the file, convert it to "
                              "safetensors with the tool that wrote it; otherwise it may be malicious") from None
    except Exception as e:
        raise CheckpointError(f"{path} could not be read as a weights-only PyTorch file ({type(e).__name__}: "
                              f"{e}); re-download it") from None


def tensor_sources(model_dir: Path) -> dict[str, TensorSource]:
    sources: dict[str, TensorSource] = {}
    for f in weight_files(model_dir):
        part = _safetensors_sources(f) if f.suffix == ".safetensors" else _torch_bin_sources(f)
        sources.update(part)
    return sources


# ----------------------------------------------------------------------------- loading a model

def validate(model: torch.nn.Module, sources: dict[str, TensorSource], where: str) -> None:
    """One error listing every missing, unexpected and mis-shaped key; nothing is read before."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    if getattr(model, "config", None) is not None and model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(set(sources) - set(expected))
    wrong = sorted(f"{k} {list(sources[k].shape)} (config.json implies {list(expected[k])})"
                   for k in set(expected) & set(sources) if sources[k].shape != expected[k])
    problems = []
    if missing:
        problems.append(f"missing {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listing(unexpected)}")
    if wrong:
        problems.append(f"mis-shaped {_listing(wrong)}")
    if problems:
        raise CheckpointError(f"the weights in {where} do not match its config.json: " + "; ".join(problems)
                              + ". Check that config.json belongs to these weights.")


def _listing(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def assign_weights(model: torch.nn.Module, sources: dict[str, TensorSource], dtype: torch.dtype,
                   device: torch.device, progress: Callable[[Iterator], Iterator] | None = None,
                   place: Callable[[torch.nn.Module, str, TensorSource, torch.device], bool] | None = None) -> None:
    """Read each tensor, cast it, and make it the parameter (assign, no copy into a preallocation).
    `place(model, key, source, device)` may take a tensor over (reading and storing it itself, as
    quantizing while loading does) by returning True. Every floating tensor is checked finite as
    it is read (see FiniteCheck)."""
    keys = list(sources)
    it = progress(keys) if progress else keys
    finite = FiniteCheck()
    for key in it:
        if place is not None and place(model, key, finite.watch(key, sources[key]), device):
            continue
        t = sources[key].load()
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        t = t.to(device)
        finite.add(key, t)
        _set_tensor(model, key, t)
    finite.raise_if_any(sources, dtype)
    if getattr(model, "config", None) is not None and model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


class FiniteCheck:
    """NaN or inf in a weight makes every logit NaN, which surfaces far away (a sampling error
    on the first token). Each tensor's min and max are taken as it is loaded: NaN propagates into
    both, inf is one of them, and aminmax reads the tensor once without a tensor-sized temporary
    (isfinite(t).all() allocates one and was 30x slower: ~3.5 ms per 100 MB against ~110 ms).
    The flags stay on the device and are read once at the end, so a GPU load never waits per tensor."""

    def __init__(self):
        self.flags: list[tuple[str, torch.Tensor]] = []

    def add(self, key: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.numel():
            lo, hi = torch.aminmax(t)
            self.flags.append((key, torch.isfinite(lo) & torch.isfinite(hi)))
        return t

    def watch(self, key: str, src: TensorSource) -> TensorSource:
        """`src`, with whatever it reads checked (for a `place` hook that reads tensors itself)."""
        return TensorSource(src.shape, src.dtype, lambda: self.add(key, src.load()), src.origin,
                            lambda a, b: self.add(key, src.rows(a, b)), src.name)

    def raise_if_any(self, sources: dict[str, TensorSource], dtype: torch.dtype) -> None:
        if not self.flags or bool(torch.stack([f.cpu() for _, f in self.flags]).all()):
            return
        key = next(k for k, f in self.flags if not bool(f))
        src = sources[key]
        t = src.load()  # as stored: was it already so, or did the cast to `dtype` overflow?
        nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        where = f"tensor {src.name or key} in {src.origin}"
        if not (nan or inf):
            raise CheckpointError(
                f"{where} holds values up to {float(t.abs().max()):.3g}, which overflow {str(dtype)[6:]} "
                f"(its largest is {torch.finfo(dtype).max:.3g}); load it in its stored {str(t.dtype)[6:]} or "
                "in bfloat16 (--dtype)")
        found = " and ".join(f"{n:,} {word}" for n, word in ((nan, "NaN"), (inf, "inf")) if n)
        raise CheckpointError(
            f"{where} holds {found} among its {t.numel():,} values, so every output would be NaN; the checkpoint "
            "is damaged (a diverged training run or a broken conversion): use an earlier checkpoint or "
            "re-download it")


def _set_tensor(model: torch.nn.Module, key: str, t: torch.Tensor) -> None:
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name)
    if name in mod._parameters:
        mod._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[name] = t


def renamed_sources(cfg: ModelConfig, raw: dict[str, TensorSource]) -> dict[str, TensorSource]:
    rename = renamer(cfg.model_type)
    out = {}
    for key, src in raw.items():
        if IGNORED.search(key):
            continue
        out[rename(key)] = src
    head, embed = out.get("lm_head.weight"), out.get("model.embed_tokens.weight")
    if cfg.tie_word_embeddings and head is not None and embed is not None:
        # Some exports store the tied head as well. As transformers does: an identical copy is
        # dropped; a different one means the weights are not tied after all (load_model unties).
        if torch.equal(head.load(), embed.load()):
            del out["lm_head.weight"]
    return out


# ----------------------------------------------------------------------------- saving

def state_for_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    cfg: ModelConfig = model.config
    rename = renamer(cfg.model_type, to_checkpoint=True)
    state = {}
    for key, t in model.state_dict().items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue
        state[rename(key)] = t
    return state


def write_files(dir: Path, files: dict[str, str | bytes | Path]) -> None:
    """Write each file into `dir`: text, bytes, or a copy of another file."""
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copyfile(content, dir / name)
        elif isinstance(content, bytes):
            (dir / name).write_bytes(content)
        else:
            (dir / name).write_text(content)


def write_atomically(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary sibling directory and rename it into place: a crash mid-write never
    leaves a directory that looks complete. An existing `out_dir` is replaced only at the end."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        honour_umask(tmp)
        _fsync_dir(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def current_umask() -> int:
    """The process umask (Linux reads it without changing it; elsewhere set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(root: Path) -> None:
    """Give a freshly written tree the modes a plain write would: mkdtemp makes its directory
    0700 and some writers make their files 0600, which would leave a saved model readable by its
    owner only while the user's umask says group and others may read it."""
    mask = current_umask()
    for d, dirs, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for name in files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                os.chmod(p, 0o666 & ~mask)


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir() if path.is_dir() else []:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


MAX_SHARD_BYTES = 5 * 2**30


def save_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index past `max_shard_bytes`."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if total <= max_shard_bytes:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += n
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
