"""The CPU kaki runs on, as kernel choices and reports need it: its model name, the instruction-set
flags that decide kaki's kernels, and torch's own dispatch level."""

from __future__ import annotations

import functools
import platform

import torch

# The /proc/cpuinfo flags that change what kaki runs: the int8 kernel builds (avx2, avx512f +
# avx512_vnni, avx_vnni) and native bf16 (avx512_bf16, amx_*).
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; elsewhere platform's name and
    no flags."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine() or "unknown CPU", flags


def model_name() -> str:
    return _cpuinfo()[0]


def flags() -> frozenset[str]:
    return _cpuinfo()[1]


def capability() -> str:
    """torch's CPU dispatch level: DEFAULT, AVX2, AVX512 (or ZVECTOR, ...)."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:
        return "unknown"


def relevant_flags() -> dict[str, bool]:
    have = flags()
    return {f: f in have for f in FLAGS}
