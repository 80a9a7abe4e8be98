"""Where a model runs and in which dtype: device choice, dtype choice, and the memory probe the
dtype rule (and the server's and training's memory checks) read."""

from __future__ import annotations

import torch

from kaki.checkpoint import DTYPES
from kaki.config import ModelConfig
from kaki.errors import KakiError
from kaki.kernels import cpu_has_fast_bf16, note_slow_bf16


def available_memory() -> int:
    """Bytes the kernel says a new allocation can get (MemAvailable); unbounded where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KakiError(f"device {device!r} asked for but this machine has no CUDA GPU; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise KakiError(f"device must be cpu, cuda[:N] or auto, not {device!r}")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: on CUDA the checkpoint's own dtype; on a CPU without native bf16, float32 when it
    fits in memory (bf16/fp16 GEMMs are several times slower there), else the checkpoint's."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise KakiError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_fast_bf16():
            note_slow_bf16(pick_dtype("auto", cfg, device))
        return DTYPES[dtype]
    stored = DTYPES.get(str(cfg.torch_dtype).replace("torch.", ""), torch.float32)
    if device.type == "cuda":
        return stored
    if stored == torch.float32:
        return torch.float32
    if stored == torch.bfloat16 and cpu_has_fast_bf16():
        return torch.bfloat16
    fp32_bytes = cfg.num_parameters() * 4
    return torch.float32 if fp32_bytes < 0.8 * available_memory() else stored
