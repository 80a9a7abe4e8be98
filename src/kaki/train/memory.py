"""Memory before the first step: what a training run will hold, from config.json alone.

The plan builds the run's model on the meta device exactly as the trainer builds the real one
(quantized layers swapped in, LoRA applied), so parameter counts are exact; bytes of weights,
adapters, gradients and optimizer state follow from those tensors and the kernels' layouts
(`held_bytes` measures the same figures on a loaded model, and the tests check they agree). The
activation figure is an estimate: the tensors autograd keeps per token and layer, counted for the
model's layer kinds (see `activation_bytes`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kaki.config import ModelConfig, read_config
from kaki.device import available_memory, pick_device
from kaki.errors import KakiError
from kaki.loading import resolve_model_path
from kaki.lora import apply_lora
from kaki.model import CausalLM
from kaki import native
from kaki.quant import as_spec, int4, int8
from kaki.quant.load import stored_spec, swap, target_modules, untie_head
from kaki.quant.train import QUANTIZED
from kaki.train.base import base_format, check_base_options, seq_len_for

GB = 1e9
# Logit rows per chunk of the loss (kaki.train.loop.chunked_loss_sum): 2^24 fp32 logits (64 MB)
# at a time, 64 tokens of a 262k vocabulary, instead of 2.1 GB of logits at 2048 tokens.
LOSS_CHUNK_ELEMS = 1 << 24


@dataclass
class Plan:
    what: str  # one line: LoRA/full, base format, seq x batch, checkpointing, compute, device
    params_total: int
    params_trained: int
    base_bytes: int  # frozen weights as held (quantized layers with their kernels' tables)
    base_kind: str
    trained_bytes: int  # fp32 master weights of what trains
    grad_bytes: int
    optimizer_bytes: int
    optimizer: str
    activation_bytes: int
    free_bytes: int | None  # None: the device is not on this machine (a dry run for another one)
    device: str
    fixes: list[str] = field(default_factory=list)  # options that would make a run that does not fit fit

    @property
    def total(self) -> int:
        return self.base_bytes + self.trained_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.total <= self.free_bytes

    def table(self) -> str:
        rows = [
            ("parameters", f"{self.params_total:,} total, {self.params_trained:,} trained"),
            (f"base weights ({self.base_kind}, frozen)", _gb(self.base_bytes)),
            ("trained weights (fp32 masters)", _gb(self.trained_bytes)),
            (f"optimizer state ({self.optimizer})", _gb(self.optimizer_bytes)),
            ("gradients (fp32)", _gb(self.grad_bytes)),
            ("activations (estimate)", _gb(self.activation_bytes)),
            ("total", _gb(self.total)),
            (f"free on {self.device}", "unknown (no such device here)" if self.free_bytes is None
             else f"{_gb(self.free_bytes)}: {'fits' if self.fits else 'does NOT fit'}"),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"memory: {self.what}"] + [f"  {k:<{width}}  {v}" for k, v in rows]
        if not self.fits and self.fixes:
            lines.append("  would fit: " + "; ".join(self.fixes))
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GB:8.2f} GB" if n >= GB / 10 else f"{n / 1e6:8.2f} MB"


# ----------------------------------------------------------------------------- the model


def build_meta(cfg, *, lora: bool, lora_r: int = 8, lora_targets: str = "all-linear", spec=None) -> nn.Module:
    """The run's model on the meta device: quantized layers swapped in as loading does, then LoRA."""
    stored = stored_spec(cfg, "config.json")
    if stored is not None:
        spec = stored[0]
    if spec is not None and stored is None:
        cfg, _ = untie_head(cfg, {}, spec)
    with torch.device("meta"):
        model = CausalLM(cfg)
    if spec is not None:
        swap(model, stored[1] if stored is not None else target_modules(model, spec), spec)
    for p in model.parameters():
        p.requires_grad_(not lora)
    if lora:
        apply_lora(model, r=lora_r, alpha=float(lora_r), targets=[t.strip() for t in lora_targets.split(",") if t.strip()],
                   dtype=torch.float32)
    return model


def quant_layer_bytes(layer: nn.Module, device: torch.device) -> int:
    """Bytes an int8/int4 layer holds once loaded for training on `device`: on CPU for the kernel
    its `start` picks, on CUDA its plain codes only (the trainer loads with keep_plain there)."""
    N, K = layer.out_features, layer.in_features
    bias = layer.bias.numel() * layer.bias.element_size() if layer.bias is not None else 0
    if isinstance(layer, int8.Int8Linear):
        kernel = int8.cpu_kernel() if device.type == "cpu" else "weight-only"
        if kernel == "native" and K > native.MAX_K:
            kernel = "fbgemm"
        rowsum = 4 * N if kernel == "native" else 0
        return N * K + 4 * N + rowsum + bias  # fbgemm's packed blocks: counted as their int8 codes
    G = K // layer.group
    tables = 2 * 2 * N * G  # bf16 scale and zero
    if device.type == "cpu" and int4.cpu_kernel_ok(N, K, layer.group):
        plain = 0 if int4.cpu_layout_known() else N * K // 2
        return N * K // 2 + plain + 2 * tables + bias
    return N * K // 2 + tables + bias


def base_param_dtype(name: str, p: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """Frozen matrices (linear weights, the embedding) stay in the storage dtype; vectors (norms,
    biases) become float32, as the trainer casts them (they are tiny, and fp32 norms keep the
    residual stream in fp32)."""
    return dtype if p.ndim >= 2 else torch.float32


def split_bytes(model: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(frozen base bytes, trained fp32 bytes) of a meta model as the trainer will hold it."""
    base = trained = 0
    seen: set[int] = set()
    quant_owned: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, QUANTIZED):
            base += quant_layer_bytes(mod, device)
            quant_owned |= {id(t) for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False))}
    for name, p in model.named_parameters(remove_duplicate=True):
        if id(p) in quant_owned or id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trained += 4 * p.numel()
        else:
            base += p.numel() * base_param_dtype(name, p, dtype).itemsize
    return base, trained


def held_bytes(model: nn.Module) -> tuple[int, int]:
    """Measured: (frozen base bytes, trained bytes) of a loaded model's tensors, counting what
    quantized layers keep privately (packed weights, kernel tables)."""
    base = trained = 0
    seen: set[int] = set()

    def add(t) -> int:
        if t is None or id(t) in seen:
            return 0
        seen.add(id(t))
        return t.numel() * t.element_size()

    for mod in model.modules():
        if isinstance(mod, QUANTIZED):
            for t in (mod.weight, mod.weight_scale, getattr(mod, "weight_zero", None), mod.bias,
                      getattr(mod, "_packed", None), getattr(mod, "_sz", None), getattr(mod, "_rowsum", None)):
                base += add(t)
            base += sum(getattr(mod, "_pack_sizes", [])) * mod.in_features
    for p in model.parameters():
        if p.requires_grad:
            trained += add(p)
        else:
            base += add(p)
    return base, trained


def optimizer_bytes(model: nn.Module, kind: str) -> int:
    """AdamW: two fp32 moments per trained weight and a 4-byte step per tensor (torch keeps it as
    a tensor); bitsandbytes' 8-bit AdamW: two 1-byte moments plus one fp32 absmax per block of 256
    (tensors under 4096 elements stay 32-bit there)."""
    total = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        n = p.numel()
        if kind == "adamw8bit" and n >= 4096:
            total += 2 * n + 2 * 4 * -(-n // 256) + 4
        else:
            total += 8 * n + 4
    return total


def activation_bytes(cfg, seq_len: int, batch: int, checkpointing: bool, act_bytes: int,
                     chunked_loss: bool = True) -> int:
    """What autograd keeps between forward and backward, per token: per layer the norms' inputs and
    outputs, q/k/v and the attention output (flash-style attention keeps no S x S scores), the
    MLP's hidden activations (two for a plain MLP, four for a gated one), ~16 hidden-sized and 2-4
    intermediate-sized vectors in all. With checkpointing only each layer's input is kept, plus
    one layer's activations while it is recomputed. The loss keeps one chunk of fp32 logits (and
    its softmax) at a time, or all of them without chunking; backward needs about as much again
    for the gradients of the largest live activations (counted as one more layer)."""
    T, H, I = seq_len * batch, cfg.hidden_size, cfg.intermediate_size
    per_layer = T * (16 * H + (4 if cfg.gated_mlp else 2) * I) * act_bytes
    L = cfg.num_hidden_layers
    if checkpointing:
        layers = L * T * H * act_bytes + 2 * per_layer
    else:
        layers = (L + 1) * per_layer
    rows = min(T, max(1, LOSS_CHUNK_ELEMS // cfg.vocab_size)) if chunked_loss else T
    loss = 3 * rows * cfg.vocab_size * 4 + 2 * T * H * 4
    return layers + loss


def free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def describe_base(dtype: torch.dtype, spec) -> str:
    if spec is None:
        return str(dtype).replace("torch.", "")
    return spec.format + (f":{spec.group_size}" if spec.group_size else "")


def plan(cfg, o, device: torch.device, seq_len: int, dtype: torch.dtype, spec, precision: str,
         world: int = 1, with_fixes: bool = True) -> Plan:
    """The memory table for TrainOptions `o` on `device` (one process's share under DDP: each rank
    holds the whole model and its own micro-batch)."""
    model = build_meta(cfg, lora=o.lora, lora_r=o.lora_r, lora_targets=o.lora_targets, spec=spec)
    base, trained = split_bytes(model, dtype, device)
    n_all = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    n_all += sum(m.out_features * m.in_features for m in model.modules() if hasattr(m, "weight_scale"))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    act = 2 if precision in ("bf16", "fp16") else 4
    kind = describe_base(dtype, spec)
    what = (f"{'LoRA r=' + str(o.lora_r) if o.lora else 'full fine-tuning'}, {kind} base, "
            f"seq {seq_len} x batch {o.batch_size}, activation checkpointing "
            f"{'on' if o.activation_checkpointing else 'off'}, {precision} compute, {device.type}"
            + (f", per process of {world}" if world > 1 else ""))
    p = Plan(what=what, params_total=n_all, params_trained=n_train, base_bytes=base, base_kind=kind,
             trained_bytes=trained, grad_bytes=4 * n_train, optimizer_bytes=optimizer_bytes(model, o.optimizer),
             optimizer=o.optimizer,
             activation_bytes=activation_bytes(cfg, seq_len, o.batch_size, o.activation_checkpointing, act,
                                               chunked_loss=not (o.fsdp and world > 1)),
             free_bytes=int(o.memory_budget * GB) if o.memory_budget else free_memory(device),
             device=f"{device} (--memory-budget)" if o.memory_budget else str(device))
    if with_fixes and not p.fits:
        p.fixes = fixes(cfg, o, device, seq_len, dtype, spec, precision, world)
    return p


def fixes(cfg, o, device, seq_len, dtype, spec, precision, world) -> list[str]:
    """The options, tried one change at a time and then together, under which the run fits."""
    tries = []
    if o.batch_size > 1:
        tries.append(("--batch-size 1 (and --grad-accum for the same global batch)", {"batch_size": 1}, None))
    if not o.activation_checkpointing:
        tries.append(("--activation-checkpointing", {"activation_checkpointing": True}, None))
    if not o.lora:
        tries.append(("--lora", {"lora": True}, None))
    if spec is None or spec.format != "int4":
        tries.append(("--lora --quantize int4", {"lora": True}, as_spec("int4")))
    if seq_len > 512:
        tries.append((f"--seq-len {seq_len // 2}", {}, None))
    found = []
    for label, change, new_spec in tries:
        o2 = dataclasses.replace(o, **change)
        s2 = seq_len // 2 if label.startswith("--seq-len") else seq_len
        # A quantized base keeps its embedding in bf16 unless --dtype says otherwise.
        dt = torch.bfloat16 if new_spec is not None and dtype == torch.float32 else dtype
        if plan(cfg, o2, device, s2, dt, new_spec or spec, precision, world, with_fixes=False).fits:
            found.append(label)
    if not found:
        o2 = dataclasses.replace(o, batch_size=1, activation_checkpointing=True, lora=True)
        dt = torch.bfloat16 if dtype == torch.float32 else dtype
        if plan(cfg, o2, device, seq_len, dt, as_spec("int4"), precision, world, with_fixes=False).fits:
            flags = [f for f, on in (("--batch-size 1", o.batch_size > 1),
                                     ("--activation-checkpointing", not o.activation_checkpointing),
                                     ("--lora", not o.lora), ("--quantize int4", True)) if on]
            found.append(" ".join(flags) + " together")
        else:
            found.append("none of batch 1, activation checkpointing, --lora and --quantize int4: a "
                         "shorter --seq-len, or a device with more memory")
    return found


def dry_run(o) -> Plan:
    """`kaki train --dry-run`: the table from config.json alone (--model DIR needs no weights nor
    tokenizer, --init-from-config a config file), for this machine's device."""
    check_base_options(o)
    if bool(o.model) == bool(o.init_from_config):
        raise KakiError("--dry-run needs --model DIR (its config.json is enough) or --init-from-config CONFIG.json")
    if o.model:
        cfg = read_config(resolve_model_path(o.model))
    else:
        try:
            cfg = ModelConfig.from_dict(json.loads(Path(o.init_from_config).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise KakiError(f"--init-from-config {o.init_from_config} could not be read as JSON ({e})") from None
    # A dry run may describe a device this machine lacks (--device cuda on a laptop).
    device = torch.device(o.device) if o.device.startswith("cuda") else pick_device(o.device)
    precision = o.precision if o.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype, spec = base_format(o)
    return plan(cfg, o, device, seq_len_for(o, cfg), dtype, spec, precision, int(os.environ.get("WORLD_SIZE", "1")))


def return_large_frees_to_os() -> None:
    """Allocations of 128 KB and up get their own pages, handed back to the OS when freed (glibc's
    mallopt M_MMAP_THRESHOLD; elsewhere nothing). glibc otherwise raises that threshold as large
    blocks are freed, up to 32 MB, and blocks under it then stay in the heap, fragmented between
    forward and backward: measured on a 224 MB model (LoRA, int8 base, checkpointing), peak RSS
    over the pre-load baseline was 364 MB at 256 tokens and 732 MB at 1024 with glibc's default,
    233 and 350 MB with this, which the memory table (whose activation figure counts live tensors)
    can then predict."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 << 10)  # M_MMAP_THRESHOLD at its default start
    except (OSError, AttributeError):
        pass


def rss_bytes(peak: bool = False) -> int:
    """This process's resident set (VmRSS), or its peak so far (VmHWM); Linux only, 0 elsewhere.
    Tests and benchmarks compare the plan against peak minus the RSS before loading."""
    key = "VmHWM:" if peak else "VmRSS:"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
