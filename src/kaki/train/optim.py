"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule.

The schedule is a pure function of the step, so "scheduler state" in a checkpoint is the step.
"""

from __future__ import annotations

import math

import torch

from kaki.errors import KakiError


def param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings, LoRA A/B); never norms or biases (1-D), whose
    decay would pull LayerNorm gains toward 0 rather than regularise anything."""
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(named: list[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float,
                   betas: tuple[float, float], eps: float, kind: str = "adamw",
                   device: torch.device | None = None) -> torch.optim.Optimizer:
    groups = param_groups(named, weight_decay)
    if kind == "adamw8bit":
        # bitsandbytes keeps Adam's moments in 8 bits (block-wise quantized): ~75% less optimizer
        # memory. Its kernels are CUDA-only.
        if device is None or device.type != "cuda":
            raise KakiError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes' kernels); use adamw")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise KakiError("--optimizer adamw8bit needs bitsandbytes: pip install 'kaki[bnb]'") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    # foreach: one fused kernel per group on CPU and CUDA alike; the result is the same math.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(step: int, *, lr: float, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr, then
    cosine or linear decay to lr * min_ratio at the last step, or constant."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup + 1:
        return lr
    frac = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    floor = lr * min_ratio
    if schedule == "linear":
        return floor + (lr - floor) * (1 - frac)
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * frac))


def default_warmup(total: int) -> int:
    return min(1000, max(0, round(0.05 * total)))
