"""LoRA: low-rank adapters on kaki's linear layers, saved in peft's file layout.

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

import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from kaki.checkpoint import renamer
from kaki.errors import KakiError
from kaki.kernels import Linear

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


class LoRALinear(Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: names and storage kept
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default A init
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = super().forward(x)
        return base + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def merged_weight(self) -> torch.Tensor:
        # In fp32 whatever the weights' dtype, rounded once at the end.
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)


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
        if not isinstance(mod, nn.Linear) or isinstance(mod, LoRALinear) or name in HEADS:
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


def apply_lora(model, r: int, alpha: float, dropout: float = 0.0, targets: list[str] | None = None) -> list[str]:
    """Swap the target linears for LoRALinear; only the adapters require grad. Returns the names."""
    if r < 1:
        raise KakiError(f"--lora-r must be >= 1, got {r}")
    names = _targets(model, targets or [ALL_LINEAR])
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, LoRALinear(getattr(parent, attr), r, alpha, dropout))
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    return names


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


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
                if tuple(tensors[k].shape) != tuple(param.shape):
                    raise KakiError(f"{path}: {k} has shape {list(tensors[k].shape)}, the model needs "
                                    f"{list(param.shape)}; the adapter belongs to another base model")
                param.copy_(tensors[k])
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


def merge_lora(model) -> None:
    """Fold every adapter into its base weight and put plain linear layers back, in place."""
    for name, m in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        plain = Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        plain.weight = nn.Parameter(m.merged_weight().detach(), requires_grad=False)
        plain.bias = m.bias
        setattr(model.get_submodule(parent_name), attr, plain)


def merge_into_model_dir(model, out: Path, tokenizer_dir, dtype: str | None = None) -> Path:
    """Write a merged copy of a LoRA model as a plain model directory (the live model keeps its
    adapters: the merge runs on a copy of the adapted layers' weights only)."""
    from kaki.llm import save_model_dir

    # Copy only the module tree, sharing the (large) unadapted parameters.
    merged = _shallow_module_copy(model)
    merge_lora(merged)
    return save_model_dir(merged, out, tokenizer_dir=tokenizer_dir, dtype=dtype)


def _shallow_module_copy(module: nn.Module) -> nn.Module:
    import copy

    new = copy.copy(module)
    new._modules = {k: _shallow_module_copy(v) if v is not None else None for k, v in module._modules.items()}
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new
