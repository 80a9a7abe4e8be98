"""kaki's own int8 CPU kernel (int8_kernel.c): built with the system C compiler on first use,
for this CPU (-march=native), cached, and called through ctypes.

The build is a plain C shared library (no Python or torch headers: under a second to compile),
kept under $KAKI_CACHE_DIR (default ~/.cache/kaki)/native, named by a hash of the source, the
compiler's version and this CPU's feature flags, and written atomically so concurrent processes
never load a half-written file. Without a compiler, or if the build fails, `library()` returns
None and int8 layers use fbgemm instead (kaki.quant.int8.cpu_kernel). ctypes releases the GIL
during the call; the kernel's threads are torch's own OpenMP workers (see the C file).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from loguru import logger

SOURCE = Path(__file__).with_name("int8_kernel.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def cache_dir() -> Path:
    root = os.environ.get("KAKI_CACHE_DIR") or Path.home() / ".cache" / "kaki"
    return Path(root) / "native"


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform
    return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot be built (logged once)."""
    if os.environ.get("KAKI_NO_NATIVE", "") not in ("", "0"):
        return None
    flags = _cpu_flags()
    if not {"avx512bw", "avx512_vnni"} <= set(flags.split()):
        logger.info("this CPU has no AVX512-VNNI: int8 layers use fbgemm's kernel")
        return None
    cc = _compiler()
    if cc is None:
        logger.info("no C compiler found: int8 layers use fbgemm's kernel")
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, flags, *FLAGS]).encode()).hexdigest()[:16]
        path = cache_dir() / f"int8_kernel-{key}.so"
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("could not build kaki's int8 kernel ({}): int8 layers use fbgemm's", str(e).strip()[:300])
        return None
    lib.kaki_int8_linear.restype = ctypes.c_int
    lib.kaki_int8_linear.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                     ctypes.c_void_p, ctypes.c_int]
    return lib


def _build(cc: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.strip().splitlines()
            raise OSError(errors[0] if errors else f"{cc} exited with {done.returncode}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


MAX_K = 65536  # the kernel's int32 lane sums hold up to this many inputs


def row_sums(q: torch.Tensor) -> torch.Tensor:
    """What the kernel needs besides the weight: each int8 row's sum (int32 [N])."""
    return q.sum(dim=1, dtype=torch.int32)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rowsum: torch.Tensor,
                bias: torch.Tensor | None = None, threads: int | None = None) -> torch.Tensor:
    """x (M, K) float32, q (N, K) int8, scale (N,) float32, rowsum = row_sums(q), bias (N,)
    float32 or None -> (M, N) float32 = x @ (q * scale[:, None]).T + bias, with each row of x
    rounded to 16 bits (the C file says how), on `threads` threads (default: torch's)."""
    lib = library()
    M, K = x.shape
    N = q.shape[0]
    if lib is None or x.dtype != torch.float32 or q.dtype != torch.int8 or q.shape[1] != K or K > MAX_K:
        raise ValueError(f"int8_linear takes float32 x (M, K) and int8 q (N, K), K <= {MAX_K}, "
                         "with the native kernel built")
    x, q = x.contiguous(), q.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(M, N, dtype=torch.float32)
    if M == 0:
        return y
    rc = lib.kaki_int8_linear(x.data_ptr(), M, K, q.data_ptr(), scale.contiguous().data_ptr(),
                              rowsum.contiguous().data_ptr(), bias.data_ptr() if bias is not None else None,
                              N, y.data_ptr(), threads or torch.get_num_threads())
    if rc:
        raise MemoryError(f"int8_linear: no memory for {M} x {K} quantized activations")
    return y
