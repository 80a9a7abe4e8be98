"""Quantizing while loading: swap the linear layers of a meta-device model for quantized ones,
then let `assign_weights` hand each of their tensors to `Placer`, one tensor at a time.

A float weight is read in blocks of rows, quantized and packed block by block, so besides the
growing quantized model only one block of source rows is ever in memory (the input embedding is
not quantized; in the checkpoint's dtype it stays a zero-copy mmap). That is what lets a
checkpoint bigger than RAM in bf16 load when its int8 form fits: Persimmon-8B (18.8 GB in bf16)
loads with a peak RSS of 8.8 GB (benchmarks/quant_load_peak.py).
A checkpoint saved quantized (config.json has our `quantization_config`) is placed as stored:
nothing is re-quantized, so a reload is bit-exact.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from kaki.checkpoint import TensorSource, renamer, validate
from kaki.config import ModelConfig
from kaki.errors import CheckpointError, KakiError
from kaki.model import CausalLM
from kaki.quant import int4, int8
from kaki.quant.spec import QuantSpec

BLOCK_BYTES = 1 << 26  # float32 rows quantized at a time: 64 MB

QuantLinear = (int8.Int8Linear, int4.Int4Linear)


def stored_spec(cfg: ModelConfig, where: str) -> tuple[QuantSpec, list[str]] | None:
    """The spec and module names (kaki names) of a checkpoint saved quantized, else None."""
    block = cfg.extra.get("quantization_config")
    if block is None:
        return None
    spec, modules = QuantSpec.from_config_block(block, where)
    rename = renamer(cfg.model_type)
    return spec, [rename(m + ".weight").removesuffix(".weight") for m in modules]


def resolve(cfg: ModelConfig, quantize: QuantSpec | None, where: str) -> tuple[QuantSpec | None, bool]:
    """(spec to load with, whether the checkpoint is stored quantized). Asking for a different
    format than a quantized checkpoint holds is an error: re-quantizing loses more."""
    stored = stored_spec(cfg, where)
    if stored is None:
        return quantize, False
    spec = stored[0]
    if quantize is not None and (quantize.format, quantize.group_size) != (spec.format, spec.group_size):
        held = spec.format + (f" (group {spec.group_size})" if spec.group_size else "")
        raise KakiError(f"{where} is already quantized as {held}; load it without --quantize, or "
                        f"quantize the original unquantized checkpoint instead")
    return spec, True


def target_modules(model: nn.Module, spec: QuantSpec) -> list[str]:
    """The linear layers a spec quantizes: every nn.Linear, and the lm_head unless spec.head is
    off. int4 needs in_features divisible by the group; a layer that is not stays float."""
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or (name == "lm_head" and not spec.head):
            continue
        if spec.format == "int4" and mod.in_features % spec.group_size:
            continue
        names.append(name)
    return names


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{module name: (out_features, in_features)} of every linear layer, from a meta model."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def swap(model: nn.Module, names: list[str], spec: QuantSpec) -> None:
    """Replace the named nn.Linear modules by empty quantized ones on the same device."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"quantization_config names {name}, which is not a linear layer of this model")
        kw = dict(bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        if spec.format == "int8":
            new = int8.Int8Linear(old.in_features, old.out_features, **kw)
        else:
            new = int4.Int4Linear(old.in_features, old.out_features, group=spec.group_size, **kw)
        setattr(parent, child, new)


def untie_head(cfg: ModelConfig, sources: dict[str, TensorSource], spec: QuantSpec):
    """A tied lm_head that gets quantized becomes its own (quantized) matrix, read from the
    embedding's tensor; the embedding itself stays float."""
    if not (cfg.tie_word_embeddings and spec.head):
        return cfg, sources
    if "lm_head.weight" not in sources and "model.embed_tokens.weight" in sources:
        sources = {**sources, "lm_head.weight": sources["model.embed_tokens.weight"]}
    return cfg.replace(tie_word_embeddings=False), sources


def prepare(cfg: ModelConfig, sources: dict[str, TensorSource], quantize: QuantSpec, where: str,
            keep_plain: bool = False, tp=None):
    """(meta model with quantized layers, sources, placer) for `assign_weights`; tp: one rank's
    part of a tensor-parallel model (kaki.tp), whose sources are already its slices."""
    spec, is_stored = resolve(cfg, quantize, where)
    if is_stored:
        _, names = stored_spec(cfg, where)
        with torch.device("meta"):
            model = CausalLM(cfg, tp)
        swap(model, names, spec)
        validate(model, sources, where)
    else:
        cfg, sources = untie_head(cfg, sources, spec)
        with torch.device("meta"):
            model = CausalLM(cfg, tp)
        validate(model, sources, where)
        names = target_modules(model, spec)
        swap(model, names, spec)
    to_ckpt = renamer(cfg.model_type, to_checkpoint=True)
    stored_names = [to_ckpt(n + ".weight").removesuffix(".weight") for n in names]
    model.config = cfg.replace(extra={**cfg.extra, "quantization_config": spec.config_block(stored_names)})
    return model, sources, Placer(spec, keep_plain)


class Placer:
    """assign_weights' hook: takes the tensors of quantized layers (float weights to quantize,
    or stored codes and scales) and leaves everything else to the default path. Both arrive in
    blocks of rows, which the layers pack as they come (see Int8Linear/Int4Linear.start)."""

    def __init__(self, spec: QuantSpec, keep_plain: bool = False):
        self.spec, self.keep_plain = spec, keep_plain
        self.pending: dict[str, dict[str, TensorSource]] = {}

    def __call__(self, model: nn.Module, key: str, source: TensorSource, device: torch.device) -> bool:
        mod_name, _, name = key.rpartition(".")
        mod = model.get_submodule(mod_name)
        if not isinstance(mod, QuantLinear) or name == "bias":
            return False
        if name == "weight" and source.dtype is not None and source.dtype.is_floating_point:
            self._fill(mod, device, lambda a, b: mod_quantize(mod, source.rows(a, b).to(device)))
            return True
        parts = self.pending.setdefault(mod_name, {})
        parts[name] = source
        need = ("weight", "weight_scale") + (("weight_zero",) if isinstance(mod, int4.Int4Linear) else ())
        if all(n in parts for n in need):
            del self.pending[mod_name]
            small = [parts[n].load().to(device) for n in need[1:]]  # scales: [N] or [N, K/group]
            self._fill(mod, device, lambda a, b: (parts["weight"].rows(a, b).to(device), *(t[a:b] for t in small)))
        return True

    def _fill(self, mod, device: torch.device, rows) -> None:
        """Hand `mod` its rows block by block: `rows(a, b)` gives the quantized tensors of rows
        a..b. Blocks hold ~BLOCK_BYTES of float32 and a multiple of 64 rows."""
        N, K = mod.out_features, mod.in_features
        step = max(64, BLOCK_BYTES // (4 * K) // 64 * 64)
        mod.start(device, self.keep_plain)
        for a in range(0, N, step):
            mod.add_rows(*rows(a, min(a + step, N)))
        mod.finish()
        release_freed_memory()

    def finish(self) -> None:
        if self.pending:
            raise CheckpointError(f"quantized layers missing parts: {', '.join(sorted(self.pending))}")


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the quantization temporaries' freed pages back to the OS (glibc only). Between the
    long-lived quantized matrices they would otherwise stay in the heap: measured on a 220 MB
    checkpoint, peak RSS grew by 290 to 480 MB from run to run without this, by ~240 MB with it."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def mod_quantize(mod, w: torch.Tensor):
    return int8.quantize(w) if isinstance(mod, int8.Int8Linear) else int4.quantize(w, mod.group)


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Quantize an already loaded model in place (tests, and models built in memory)."""
    cfg = model.config
    if cfg.extra.get("quantization_config") is not None:
        raise KakiError("this model is already quantized")
    if cfg.tie_word_embeddings and spec.head:
        old_head = model.lm_head
        head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=old_head.weight.device)
        head.weight = nn.Parameter(old_head.weight.detach().clone(), requires_grad=False)
        head.bias = old_head.bias  # GPT-J's head has one; only the weight was tied
        model.lm_head = head
        cfg = cfg.replace(tie_word_embeddings=False)
    names = target_modules(model, spec)
    floats = {n: model.get_submodule(n) for n in names}
    swap(model, names, spec)
    for n, old in floats.items():
        new = model.get_submodule(n)
        new.set_float(old.weight.detach(), old.weight.device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach(), requires_grad=False)
    to_ckpt = renamer(cfg.model_type, to_checkpoint=True)
    model.config = cfg.replace(extra={**cfg.extra, "quantization_config": spec.config_block(
        [to_ckpt(n + ".weight").removesuffix(".weight") for n in names])})
    return model
