"""LoRA: low-rank adapters on kaki's linear layers, saved in peft's file layout.

Training adds them (`kaki train --lora`), inference applies or merges them (`--adapter`,
`kaki merge-lora`), so the module sits beside the loader rather than in kaki.train.

`LoRALinear` replaces a linear layer in place and keeps its `weight`/`bias` under the same names,
so the base model's state dict, loader and saver are untouched; it adds `lora_A` (r, in) and
`lora_B` (out, r), and computes `W x + b + (alpha / r) * B A dropout(x)`. B starts at zero, so
training starts from the base model exactly (peft's init).

Adapters are written as peft writes them: adapter_config.json (peft_type LORA, r, lora_alpha,
target_modules, base_model_name_or_path) and adapter_model.safetensors with keys
`base_model.model.<checkpoint module name>.lora_A.weight`, module names in the checkpoint's own
naming (kaki's internal names renamed back through kaki.checkpoint's tables).

Why not peft's own LoraModel on kaki's model: peft would save keys in kaki's internal names (Llama's
`dense_4h_to_h`, not `down_proj`), which transformers + peft could not load; kaki's adapter layer is
a few lines and keeps the checkpoint's names. The format is peft's, checked against peft itself in
both directions (tests/test_lora_peft.py); peft options kaki does not implement (DoRA, rsLoRA,
per-layer ranks, ...) are refused when an adapter is loaded, never ignored.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kaki.checkpoint import DTYPES, renamer
from kaki.config import read_config
from kaki.errors import KakiError
from kaki.kernels import Linear
from kaki.loading import load_model, resolve_model_path
from kaki.quant.train import QUANTIZED, frozen_forward, needs_frozen_path
from kaki.saving import save_model_dir
from kaki.tp.shard import adapter_slice

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
ALL_LINEAR = "all-linear"
# Output heads (the LM head, a classifier's `score`) are never adapted: a classifier's new head
# trains whole, as peft's modules_to_save does.
HEADS = ("lm_head", "score")
# adapter_config.json keys whose non-default values kaki cannot apply, with the values that are fine.
UNSUPPORTED_PEFT_OPTIONS = {
    "use_dora": (None, False), "use_rslora": (None, False), "rank_pattern": (None, {}),
    "alpha_pattern": (None, {}), "bias": (None, "none"), "fan_in_fan_out": (None, False),
    "layers_to_transform": (None, [], ()), "modules_to_save": (None, [], ()),
    "lora_bias": (None, False),
}


class LoRAParts:
    """The adapter half of a LoRA layer: `lora_A` (r, in) and `lora_B` (out, r) in `dtype` (float32
    masters when training, whatever the base is stored in)."""

    def add_adapter(self, r: int, alpha: float, dropout: float, device, dtype) -> None:
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default A init
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        a = self.lora_A
        d = F.linear(F.linear(self.dropout(x).to(a.dtype), a), self.lora_B) * self.scale
        return d.to(like.dtype)

    def merged_with(self, w: torch.Tensor) -> torch.Tensor:
        """w + scale * B A in fp32 (whatever the weights' dtype; the caller rounds once)."""
        return w.float() + (self.lora_B.float() @ self.lora_A.float()) * self.scale


class LoRALinear(LoRAParts, Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and storage kept
        self.add_adapter(r, alpha, dropout, base.weight.device, dtype or base.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A frozen base in another dtype than float32 (`kaki train --dtype bfloat16`) goes through
        # kaki.quant.train's FrozenLinear, which keeps no cast copy of the weight for backward.
        if needs_frozen_path(self) and (torch.is_grad_enabled() or x.dtype != self.weight.dtype):
            base = frozen_forward(self, x)
        else:
            base = super().forward(x)
        return base + self.delta(x, base)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.merged_with(self.weight).to(dtype or self.weight.dtype)


class QuantLoRALinear(LoRAParts, nn.Module):
    """LoRA over a quantized layer (QLoRA): the int8/int4 layer stays whole as `base_layer` (as
    peft names it), so its kernels run it; gradients reach the input through it by
    kaki.quant.train (the trainer routes `base_layer`), none is kept for its weight."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_layer = base
        self.add_adapter(r, alpha, dropout, base.weight_scale.device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer(x)
        return base + self.delta(x, base)

    @property
    def bias(self):
        return self.base_layer.bias

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Against the dequantized weight: the quantization error stays in the merged model."""
        return self.merged_with(self.base_layer.dequantized(torch.float32)).to(dtype or torch.float32)


def _checkpoint_name(model, kaki_name: str) -> str:
    return renamer(model.config.model_type, to_checkpoint=True)(kaki_name + ".weight")[:-len(".weight")]


def _targets(model, targets: list[str] | str) -> list[str]:
    """kaki module names of the linear layers to adapt, with peft's matching rules: a target list
    entry matches a layer whose name (kaki's or the checkpoint's, e.g. `dense` or Llama's
    `o_proj`) is the entry or ends with "." + the entry, so a last name (`q_proj`) and a full path
    (`model.layers.0.self_attn.q_proj`, as peft saves `all-linear`) both work; a single string
    other than `all-linear` is a regular expression the whole checkpoint name must match;
    `all-linear` is every linear layer but the output head."""
    found = []
    regex = re.compile(targets) if isinstance(targets, str) and targets != ALL_LINEAR else None
    wanted = [targets] if isinstance(targets, str) else list(targets)
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, *QUANTIZED)) or isinstance(mod, LoRAParts) or name in HEADS \
                or name.endswith(".base_layer"):
            continue
        names = (name, _checkpoint_name(model, name))
        if regex is not None:
            hit = regex.fullmatch(names[1]) is not None
        else:
            hit = ALL_LINEAR in wanted or any(n == t or n.endswith("." + t) for n in names for t in wanted)
        if hit:
            found.append(name)
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, nn.Linear) and n not in HEADS})
        raise KakiError(f"--lora-targets {','.join(wanted)} matches no linear layer; this model has "
                        f"{', '.join(names)} (or use all-linear)")
    return found


def apply_lora(model, r: int, alpha: float, dropout: float = 0.0, targets: list[str] | None = None,
               dtype: torch.dtype | None = None) -> list[str]:
    """Swap the target linears for LoRA layers (QuantLoRALinear over int8/int4 ones); only the
    adapters require grad. `dtype`: the adapters' (default: the float weights' own, the model's
    for a quantized layer). Returns the names."""
    if r < 1:
        raise KakiError(f"--lora-r must be >= 1, got {r}")
    names = _targets(model, targets or [ALL_LINEAR])
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        if isinstance(old, QUANTIZED):
            new = QuantLoRALinear(old, r, alpha, dropout, dtype or model.dtype)
        else:
            new = LoRALinear(old, r, alpha, dropout, dtype)
        setattr(parent, attr, new)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return names


def lora_modules(model) -> dict[str, LoRAParts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAParts)}


def save_adapter(model, out: Path, base_model: str | None = None, tokenizer_dir=None) -> None:
    """Write adapter_config.json + adapter_model.safetensors into the directory `out` (which the
    caller writes atomically: a training checkpoint, or kaki's final output)."""
    mods = lora_modules(model)
    if not mods:
        raise KakiError("the model has no LoRA adapters to save")
    tensors = {}
    for name, m in mods.items():
        key = PREFIX + _checkpoint_name(model, name)
        tensors[f"{key}.lora_A.weight"] = m.lora_A.detach().contiguous().cpu()
        tensors[f"{key}.lora_B.weight"] = m.lora_B.detach().contiguous().cpu()
    first = next(iter(mods.values()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "target_modules": sorted({_checkpoint_name(model, n).rsplit(".", 1)[-1] for n in mods}),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": os.path.abspath(base_model) if base_model else None,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(tensors, Path(out) / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (Path(out) / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_config(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise KakiError(f"{adapter_dir} is not a LoRA adapter directory (no {ADAPTER_CONFIG}); "
                        "pass the directory `kaki train --lora` wrote")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KakiError(f"{path} is not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise KakiError(f"{path} describes a {cfg.get('peft_type')!r} adapter; kaki applies LORA only")
    # peft options that change the computation and kaki does not implement: refused, never ignored.
    unsupported = [key for key, off in UNSUPPORTED_PEFT_OPTIONS.items() if cfg.get(key) not in off]
    if unsupported:
        raise KakiError(f"{path} uses peft option(s) kaki does not implement: "
                        f"{', '.join(f'{k}={cfg[k]!r}' for k in unsupported)}; merge the adapter with "
                        "peft (merge_and_unload) and load the merged model instead")
    return cfg


def load_adapter_weights(model, adapter_dir: str | Path) -> None:
    """Copy the adapter's A/B matrices into the model's LoRALinear layers (every one must match)."""
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise KakiError(f"{adapter_dir} has no {ADAPTER_WEIGHTS}")
    tensors = load_file(path)
    mods = lora_modules(model)
    expected = set()
    with torch.no_grad():
        for name, m in mods.items():
            key = PREFIX + _checkpoint_name(model, name)
            for part, param in (("lora_A", m.lora_A), ("lora_B", m.lora_B)):
                k = f"{key}.{part}.weight"
                expected.add(k)
                if k not in tensors:
                    raise KakiError(f"{path} lacks {k}; it was trained for other target layers")
                t = adapter_slice(model, name, part, tensors[k])  # a tensor-parallel rank's part
                if tuple(t.shape) != tuple(param.shape):
                    raise KakiError(f"{path}: {k} has shape {list(tensors[k].shape)}, the model needs "
                                    f"{list(param.shape)}; the adapter belongs to another base model")
                param.copy_(t)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise KakiError(f"{path} holds weights for layers this model does not adapt: {', '.join(extra[:4])}")


def apply_adapter_to_model(model, adapter_dir: str | Path) -> None:
    cfg = read_adapter_config(adapter_dir)
    apply_lora(model, r=int(cfg["r"]), alpha=float(cfg["lora_alpha"]), dropout=0.0,
               targets=cfg["target_modules"])
    load_adapter_weights(model, adapter_dir)
    for p in model.parameters():
        p.requires_grad_(False)


def apply_adapter(llm, adapter_dir: str | Path):
    """`--adapter DIR` for generate/chat/serve: add the adapter to a loaded LLM without merging."""
    apply_adapter_to_model(llm.model, adapter_dir)
    return llm


def merge_lora(model, dtype: torch.dtype | None = None) -> None:
    """Fold every adapter into its base weight and put plain linear layers back, in place. The sum
    is taken in fp32 and rounded once, to `dtype` (default: the base weight's; float32 over a
    quantized layer)."""
    for name, m in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.merged_weight(dtype).detach(), requires_grad=False)
        plain.bias = m.bias
        setattr(model.get_submodule(parent_name), attr, plain)


def dequantize_layers(model, dtype: torch.dtype) -> None:
    """Put float linear layers (`dtype`) back for every remaining int8/int4 one, and drop the
    config's quantization_config: the model is then a plain float model."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, QUANTIZED):
            continue
        parent_name, _, attr = name.rpartition(".")
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.dequantized(dtype), requires_grad=False)
        plain.bias = m.bias
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)
    extra = {k: v for k, v in model.config.extra.items() if k != "quantization_config"}
    model.config = model.config.replace(extra=extra)


def merge_adapter_dir(adapter_dir, base, out, dtype: str = "bfloat16") -> str:
    """`kaki merge-lora`: BASE + ADAPTER written to `out` as a float model in `dtype`. The base is
    read in its checkpoint's own dtype (no rounding), each adapted weight summed in fp32 and
    rounded once. Returns a sentence saying what the adapter was merged against: a base stored
    quantized has no float weights, so the merge is against its dequantized weights."""
    base_dir = resolve_model_path(base)
    cfg = read_config(base_dir)
    held = cfg.extra.get("quantization_config")
    stored = DTYPES.get(str(cfg.torch_dtype).replace("torch.", ""), torch.float32)
    model = load_model(base_dir, cfg, stored, torch.device("cpu"))
    apply_adapter_to_model(model, adapter_dir)
    merge_lora(model, DTYPES[dtype])
    if held is not None:
        dequantize_layers(model, DTYPES[dtype])
    path = save_model_dir(model, out, tokenizer_dir=base_dir, dtype=dtype)
    if held is None:
        return f"merged into the float weights of {base_dir} ({dtype}): {path}"
    fmt = held.get("format", "quantized") if isinstance(held, dict) else "quantized"
    return (f"only a quantized base was available ({base_dir}, {fmt}): merged against its dequantized "
            f"weights, so {path} ({dtype}) keeps the quantization error; pass --model with the original "
            "float checkpoint for an exact merge")


def merge_into_model_dir(model, out: Path, tokenizer_dir, dtype: str | None = None) -> Path:
    """Write a merged copy of a LoRA model as a plain model directory (the live model keeps its
    adapters: the merge runs on a copy of the adapted layers' weights only)."""
    # Copy only the module tree, sharing the (large) unadapted parameters.
    merged = _shallow_module_copy(model)
    merge_lora(merged)
    return save_model_dir(merged, out, tokenizer_dir=tokenizer_dir, dtype=dtype)


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    new = copy.copy(module)
    new._modules = {k: _shallow_module_copy(v) if v is not None else None for k, v in module._modules.items()}
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new
