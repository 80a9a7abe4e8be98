"""kaki's own CPU kernels: built with the system C compiler on first use, cached, and called
through ctypes, in one of several variants chosen by the CPU's flags. Each variant's library holds
the int8 product (int8_linear) and the float32 small-M product (f32_rows, quant/rows_f32.h).

Variants, best first (`VARIANTS`; `variant()` says which one this process uses):
- "avx512-vnni" (int8_kernel.c): VNNI's vpdpbusd on 512-bit vectors. Built with -march=native:
  it is only ever built on the CPU that runs it, and that is how it was tuned and measured.
- "avx2-vnni" (int8_kernel_avx2.c with -mavxvnni): AVX-VNNI's 256-bit vpdpwssd (recent Intel
  laptop and desktop cores).
- "avx2" (int8_kernel_avx2.c): vpmaddwd, which every AVX2 CPU has.
All compute the same exact integer sums and the same floats from them. The AVX2 builds use
explicit flags (-mavx2 -mfma [-mavxvnni]), not -march=native, so an AVX-512 machine builds and
tests exactly the code an AVX2-only machine runs. KAKI_INT8_VARIANT=<name> forces one;
KAKI_NO_NATIVE=1 turns the kernel off. Without any (no AVX2, no compiler, the build fails),
`library()` returns None and int8 layers use fbgemm instead (kaki.quant.int8.cpu_kernel).

The build is a plain C shared library (no Python or torch headers: under a second to compile),
kept under $KAKI_CACHE_DIR (default ~/.cache/kaki)/native, named by a hash of the source, the
compiler's version and the flags, and written atomically so concurrent processes never load a
half-written file. A cached file is loaded only if it is a regular file owned by this user and
writable by nobody else, in a directory of which the same holds (else the directory may hold a
library someone else planted: the kernel is then built into a fresh private directory), and an
empty or unloadable cached file is rebuilt rather than trusted or given up on. ctypes releases the
GIL during the call; the kernel's threads are torch's own OpenMP workers (see the C files).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from kaki.errors import KakiError
from kaki.paths import cache_root

HERE = Path(__file__).parent / "quant"  # the C sources (the int8 kernel came first)
HEADERS = ("rows_f32.h",)  # included by every variant's source
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=c11")


@dataclass(frozen=True)
class Variant:
    name: str
    source: Path
    flags: tuple[str, ...]  # what selects the instruction set, besides COMMON_FLAGS
    cpu: tuple[str, ...]  # the /proc/cpuinfo flags its instructions need


VARIANTS = {v.name: v for v in (
    Variant("avx512-vnni", HERE / "int8_kernel.c", ("-march=native",),
            ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")),
    Variant("avx2-vnni", HERE / "int8_kernel_avx2.c", ("-mavx2", "-mfma", "-mavxvnni"), ("avx2", "fma", "avx_vnni")),
    Variant("avx2", HERE / "int8_kernel_avx2.c", ("-mavx2", "-mfma"), ("avx2", "fma")),
)}

MAX_K = 65536  # every build's integer sums are exact up to this many inputs (the C files say why)


def cache_dir() -> Path:
    return cache_root() / "native"


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform
    return platform.processor()


def missing(name: str) -> list[str]:
    """The CPU flags variant `name` needs that this CPU lacks (empty: it can run here)."""
    have = set(_cpu_flags().split())
    return [f for f in VARIANTS[name].cpu if f not in have]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cache_path(name: str, cc: str) -> Path:
    """Where variant `name` built by `cc` is cached. The -march=native build also depends on the
    CPU, so its key holds the CPU's flags; the others are the same bytes on every machine."""
    v = VARIANTS[name]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    cpu = _cpu_flags() if "-march=native" in v.flags else ""
    sources = [v.source.read_text(), *((HERE / h).read_text() for h in HEADERS)]
    key = hashlib.sha256("\0".join([*sources, version, cpu, *COMMON_FLAGS, *v.flags]).encode())
    return cache_dir() / f"int8_kernel-{name}-{key.hexdigest()[:16]}.so"


def build(name: str, path: Path, cc: str | None = None) -> None:
    """Compile variant `name` to `path` (atomically). Needs a compiler, not a CPU that runs it."""
    cc = cc or _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC)")
    v = VARIANTS[name]
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        done = subprocess.run([cc, *COMMON_FLAGS, *v.flags, str(v.source), "-o", tmp], capture_output=True,
                              text=True, timeout=120)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.strip().splitlines()
            raise OSError(errors[0] if errors else f"{cc} exited with {done.returncode}")
        # The linker creates its output with the umask's mode, which may let the group write it;
        # the loader would then refuse the cached file every time.
        os.chmod(tmp, 0o700)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _private(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else: only this user can have put it there."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _trusted_dir(d: Path) -> bool:
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(d)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not _private(st):
            # Ours, but the group may write it (made under a umask of 002): close it. A file someone
            # else put there is theirs, or writable by others, and _cached refuses it.
            os.chmod(d, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
            st = os.stat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and _private(st)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.kaki_int8_linear  # AttributeError: some other library
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    rows = lib.kaki_f32_rows
    rows.restype = ctypes.c_int
    rows.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                     ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    return lib


def _cached(path: Path) -> ctypes.CDLL | None:
    """The library at `path` if it is there and can be trusted and loaded; None means build it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or not _private(st):
        logger.warning("ignoring {}: not a regular file owned by this user and writable only by it; rebuilding", path)
        return None
    if st.st_size == 0:
        logger.warning("ignoring {}: empty (an interrupted write?); rebuilding", path)
        return None
    try:
        return _open(path)
    except (OSError, AttributeError) as e:
        logger.warning("ignoring {}: it does not load ({}); rebuilding", path, str(e).strip()[:200])
        return None


@functools.lru_cache(maxsize=None)
def _load(name: str) -> ctypes.CDLL | None:
    """Variant `name`, built if need be, or None where it cannot run or be built (logged once)."""
    lacking = missing(name)
    if lacking:
        # Debug only: probing the variants best-first meets this on most CPUs (an AVX2 laptop lacks
        # the AVX-512 ones), and float32 models probe too (the small-M `native` product).
        logger.debug("this CPU lacks {} for the {} int8 kernel", ", ".join(lacking), name)
        return None
    cc = _compiler()
    if cc is None:
        logger.info("no C compiler found: kaki's {} int8 kernel cannot be built", name)
        return None
    try:
        path = cache_path(name, cc)
        private = not _trusted_dir(path.parent)
        lib = None if private else _cached(path)
        if lib is None:
            if private:
                # Someone else could write (or own) the cache: build where only we can, load, and
                # remove it (the loaded mapping stays valid).
                logger.warning("{} is not a directory private to this user: building the int8 kernel "
                               "in a temporary one", path.parent)
                path = Path(tempfile.mkdtemp(prefix="kaki-int8-")) / path.name
            try:
                build(name, path, cc)
                lib = _open(path)
            finally:
                if private:
                    shutil.rmtree(path.parent, ignore_errors=True)
    except (OSError, AttributeError, subprocess.SubprocessError) as e:
        logger.warning("could not build kaki's {} int8 kernel ({})", name, str(e).strip()[:300])
        return None
    return lib


@functools.lru_cache(maxsize=1)
def variant() -> str | None:
    """The variant int8 layers use in this process (the best one this CPU runs and this machine
    builds, or KAKI_INT8_VARIANT's), or None: int8 layers then use fbgemm."""
    if os.environ.get("KAKI_NO_NATIVE", "") not in ("", "0"):
        logger.info("KAKI_NO_NATIVE is set: int8 layers use fbgemm's kernel")
        return None
    forced = os.environ.get("KAKI_INT8_VARIANT", "")
    if forced and forced not in VARIANTS:
        raise KakiError(f"KAKI_INT8_VARIANT must be one of {', '.join(VARIANTS)}, not {forced!r}")
    for name in [forced] if forced else VARIANTS:
        if _load(name) is not None:
            logger.debug("kaki's int8 kernel: the {} build", name)
            return name
    logger.info("kaki's int8 kernel {} here (see above): int8 layers use fbgemm's",
                f"({forced}) cannot be used" if forced else "cannot be built")
    return None


def library(name: str | None = None) -> ctypes.CDLL | None:
    """Variant `name`'s loaded library (None where this CPU cannot run it or it does not build);
    by default the one `variant()` chose."""
    name = name or variant()
    return _load(name) if name else None


def cache_clear() -> None:
    """Forget the choice and the loaded libraries (after changing the environment)."""
    variant.cache_clear()
    _load.cache_clear()


def row_sums(q: torch.Tensor) -> torch.Tensor:
    """What the kernel needs besides the weight: each int8 row's sum (int32 [N])."""
    return q.sum(dim=1, dtype=torch.int32)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, rowsum: torch.Tensor,
                bias: torch.Tensor | None = None, threads: int | None = None,
                variant: str | None = None) -> torch.Tensor:
    """x (M, K) float32, q (N, K) int8, scale (N,) float32, rowsum = row_sums(q), bias (N,)
    float32 or None -> (M, N) float32 = x @ (q * scale[:, None]).T + bias, with each row of x
    rounded to 16 bits (the C files say how), on `threads` threads (default: torch's), by
    `variant` (default: the chosen one)."""
    lib = library(variant)
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


def f32_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, threads: int = 1,
             variant: str | None = None) -> torch.Tensor:
    """x (..., K) @ weight (N, K).T + bias, all float32, by the library's small-M product
    (quant/rows_f32.h): the weight streamed once for up to 8 rows of x, on `threads` threads.
    Meant for 1-8 rows; more run in blocks of 8 (each streams the weight again)."""
    lib = library(variant)
    K = x.shape[-1]
    N = weight.shape[0]
    if lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape[1] != K:
        raise ValueError("f32_rows takes float32 x (..., K) and weight (N, K), with the native library built")
    x2 = x.reshape(-1, K).contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    y = torch.empty(x2.shape[0], N, dtype=torch.float32)
    if x2.shape[0]:
        lib.kaki_f32_rows(x2.data_ptr(), x2.shape[0], K, weight.data_ptr(),
                          bias.data_ptr() if bias is not None else None, N, y.data_ptr(), threads)
    return y.view(*x.shape[:-1], N)
