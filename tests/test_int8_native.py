"""kaki's own int8 CPU kernel (kaki/quant/int8_kernel*.c through kaki.native), in every
variant this CPU runs: their integer arithmetic is exact, so each output must equal, to the bit, a
float64 model of that arithmetic; odd shapes exercise every tail (rows, weight rows, inputs not a
multiple of the vector width, inputs beyond one int32 accumulation chunk). The AVX2 builds must
hold no AVX-512 instruction; the choice of variant follows the CPU's flags and the environment,
falls back to fbgemm where nothing builds, and a cached library is only loaded if nobody else
could have written it."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import stat
import subprocess

import pytest
import torch
from loguru import logger

from kaki.errors import KakiError
from kaki import native
from kaki.quant import int8

RUNNABLE = [v for v in native.VARIANTS if not native.missing(v)]
AVX2 = ("avx2", "avx2-vnni")


def variant_params(prefix: str = ""):
    """One pytest param per variant (`prefix` + its name); those this CPU cannot run skip, naming
    the missing flags. tests/test_quant*.py use it too."""
    return [pytest.param(prefix + v, marks=pytest.mark.skipif(
        bool(native.missing(v)), reason=f"this CPU lacks {', '.join(native.missing(v))} for the {v} kernel"))
        for v in native.VARIANTS]


needs_any = pytest.mark.skipif(not RUNNABLE, reason="needs an x86 CPU with AVX2 (flags avx2, fma)")
needs_x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                               reason="builds x86-64 code: needs an x86-64 machine")


def codes(x):
    """Each row of x to the kernel's 16-bit codes, with float32 ops as the C code does them."""
    amax = x.abs().amax(dim=1)
    step = torch.where(amax > 0, amax / 32767.0, torch.ones_like(amax))
    return torch.round(x * (1.0 / step)[:, None]), step


def reference(x, q, scale, bias):
    """The kernel's arithmetic in float64: codes, then the exact integer product."""
    c, step = codes(x)
    y = (c.double() @ q.double().T) * step.double()[:, None] * scale.double()
    return y + bias.double() if bias is not None else y


def exact(x, q, scale, bias):
    """What every build returns, to the bit: the int64 sum, one float64 rounding of
    sum * (step * scale) (that factor is exact), to float32, plus the bias in float32."""
    c, step = codes(x)
    dot = c.long() @ q.long().T
    y = (dot.double() * (step.double()[:, None] * scale.double())).float()
    return y + bias if bias is not None else y


def problem(M, N, K, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed + M * 1000 + N + K)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[0, 0] = 0.0  # zeros and a row's extreme value both on the grid's exact points
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) * 0.01 + 1e-4
    bias = torch.randn(N, generator=g) if with_bias else None
    return x, q, scale, bias


# Rows 1, 2, 3, 4, 8 and 33 (and the blocks' remainders), odd N and K, K past one 4096-input chunk.
SHAPES = [(1, 7, 5), (1, 200, 300), (1, 33, 8193), (1, 4096, 256), (2, 37, 64), (2, 50, 9001), (3, 130, 200),
          (4, 100, 4096), (5, 64, 129), (8, 300, 1000), (9, 67, 70), (33, 71, 4099), (40, 130, 260)]


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("M,N,K", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_kernel_equals_its_integer_arithmetic(variant, M, N, K, with_bias):
    x, q, scale, bias = problem(M, N, K, with_bias)
    y = native.int8_linear(x, q, scale, native.row_sums(q), bias, variant=variant)
    want = reference(x, q, scale, bias)
    assert y.shape == (M, N) and y.dtype == torch.float32
    # Only the float32 output rounding (and the bias add in float32) separates them...
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    # ...and every build rounds the same way: identical floats whichever variant runs.
    assert torch.equal(y, exact(x, q, scale, bias))


@pytest.mark.parametrize("variant", variant_params())
def test_largest_sums_are_exact(variant):
    """K = MAX_K inputs, every code at +-32767 against weights -128 and 127: the largest integer
    sums there are (~2^38), past any int32 accumulator, must come out exact."""
    K = native.MAX_K
    x = torch.ones(3, K)
    x[1, ::2] = -1.0
    x[2] = torch.randn(K, generator=torch.Generator().manual_seed(0))
    q = torch.full((4, K), -128, dtype=torch.int8)
    q[1] = 127
    q[2, 1::2] = 127
    q[3] = torch.randint(-128, 128, (K,), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    scale = torch.ones(4)
    y = native.int8_linear(x, q, scale, native.row_sums(q), None, variant=variant)
    # Row 0 against row 0: the integer sum is -32767 * 128 * K (~2^38), the result x . w = -128 K.
    assert float(y[0, 0]) == pytest.approx(-128.0 * K, rel=1e-6)
    assert torch.equal(y, exact(x, q, scale, None))


@pytest.mark.parametrize("variant", variant_params())
def test_all_zero_rows_and_threads_do_not_change_the_result(variant):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=g)
    x[2] = 0.0
    q = torch.randint(-127, 128, (1000, 300), generator=g, dtype=torch.int8)
    scale, rs = torch.rand(1000, generator=g) + 0.1, native.row_sums(q)
    one, two = (native.int8_linear(x, q, scale, rs, None, threads=t, variant=variant) for t in (1, 2))
    assert torch.equal(one, two)  # every output is one thread's, whatever the split
    assert torch.equal(one[2], torch.zeros(1000))


@pytest.fixture
def env(monkeypatch, tmp_path):
    """A private kernel cache and no kernel settings from outside; choices forgotten before and after."""
    monkeypatch.setenv("KAKI_CACHE_DIR", str(tmp_path))
    for name in ("KAKI_INT8_KERNEL", "KAKI_INT8_VARIANT", "KAKI_NO_NATIVE"):
        monkeypatch.delenv(name, raising=False)
    native.cache_clear()
    int8.cpu_kernel.cache_clear()
    yield monkeypatch
    native.cache_clear()
    int8.cpu_kernel.cache_clear()


@pytest.fixture
def logs():
    messages: list[str] = []
    handle = logger.add(lambda m: messages.append(m.record["message"]), level="DEBUG")
    yield messages
    logger.remove(handle)


@pytest.mark.parametrize("variant", variant_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_runs_the_chosen_variant(env, variant, dtype):
    """KAKI_INT8_VARIANT picks the build an int8 layer runs, for float32 and bfloat16 activations
    alike (the layer computes in float32), with the same floats as the integer model."""
    env.setenv("KAKI_INT8_VARIANT", variant)
    env.setenv("KAKI_INT8_KERNEL", "native")
    g = torch.Generator().manual_seed(2)
    layer = int8.Int8Linear(259, 97, bias=True, dtype=dtype)
    layer.bias = torch.nn.Parameter(torch.randn(97, generator=g).to(dtype), requires_grad=False)
    layer.set_float(torch.randn(97, 259, generator=g) * 0.05, torch.device("cpu"))
    assert native.variant() == layer.variant == variant and f"kernel=native, variant={variant}" in repr(layer)
    for rows in (1, 2, 3, 4, 8, 33):
        x = torch.randn(rows, 259, generator=g).to(dtype)
        want = exact(x.float(), layer.weight, layer.weight_scale, layer.bias.float()).to(dtype)
        assert torch.equal(layer(x), want)


@needs_any
def test_layer_uses_it_by_default_and_matches_the_float_product(env):
    """An int8 layer on this CPU runs the native kernel in its best variant, within 16-bit
    rounding of the float product of its dequantized weight (fbgemm's 8-bit activations are
    ~100x further)."""
    layer = int8.Int8Linear(512, 384, bias=True)
    g = torch.Generator().manual_seed(2)
    layer.bias = torch.nn.Parameter(torch.randn(384, generator=g), requires_grad=False)
    layer.set_float(torch.randn(384, 512, generator=g) * 0.05, torch.device("cpu"))
    assert layer.kernel == "native" and layer.variant == RUNNABLE[0] and "kernel=native" in repr(layer)
    x = torch.randn(3, 7, 512, generator=g)
    want = torch.nn.functional.linear(x, layer.dequantized(), layer.bias)
    err = float((layer(x) - want).norm() / want.norm())
    eight = torch.ops.quantized.linear_dynamic(x.reshape(-1, 512), int8._prepack(
        layer.int8_weight(), layer.weight_scale, "fbgemm"), int8.reduce_range()).reshape(3, 7, 384) + layer.bias
    assert err < 5e-5 and float((eight - want).norm() / want.norm()) > 30 * err


# ----------------------------------------------------------------------------- the builds

EVEX = re.compile(r"^\s*[0-9a-f]+:\t((?:(?:66|67|f2|f3|2e|3e|26|36|64|65) )*)62 ")


@needs_x86
@pytest.mark.parametrize("variant", AVX2)
def test_avx2_builds_hold_no_avx512_instruction(variant, tmp_path):
    """The AVX2 builds are made with explicit flags, so this check holds on any machine: no zmm or
    mask register, and no EVEX-encoded instruction (which an AVX2-only CPU cannot run, whatever
    its registers), in the library, and none in the compiler's assembly either."""
    cc = native._compiler()
    out = tmp_path / "k.so"
    native.build(variant, out, cc)
    v = native.VARIANTS[variant]
    asm = subprocess.run([cc, *[f for f in native.COMMON_FLAGS if f != "-shared"], *v.flags, "-S", "-o", "-",
                          str(v.source)], capture_output=True, text=True, check=True).stdout
    assert "zmm" not in asm and "{evex}" not in asm and not re.search(r"%k[0-7]\b", asm)
    mul = "{vex} vpdpwssd" if variant == "avx2-vnni" else "vpmaddwd"
    assert mul in asm
    if shutil.which("objdump"):  # binutils: the instructions as the CPU will decode them
        dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(out)], capture_output=True, text=True,
                             check=True).stdout
        raw = subprocess.run(["objdump", "-d", str(out)], capture_output=True, text=True, check=True).stdout
        assert "zmm" not in dis and not re.search(r"%k[0-7]\b", dis) and mul.split()[-1] in dis
        evex = [line for line in raw.splitlines() if EVEX.match(line) and line.count("\t") >= 2]
        assert not evex, evex[:5]


@needs_x86
def test_choice_follows_the_cpu_flags(env, logs):
    """Best variant the flags allow; a variant that does not build gives way to the next; with no
    AVX2 (or KAKI_NO_NATIVE, or no compiler) int8 layers use fbgemm, and forcing the native
    kernel there is an error. Loading a library runs none of its instructions, so every branch
    is taken on any x86 machine with a compiler."""
    fallback = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "weight-only"
    avx512 = " ".join(native.VARIANTS["avx512-vnni"].cpu)

    def choose(flags):
        env.setattr(native, "_cpu_flags", lambda: f"flags\t\t: fpu sse2 {flags}")
        native.cache_clear()
        int8.cpu_kernel.cache_clear()
        return native.variant()

    assert choose("avx2 fma") == "avx2" and int8.cpu_kernel() == "native"
    assert choose("avx2 fma avx_vnni") == "avx2-vnni"
    assert native.library() is native.library("avx2-vnni") is not None
    assert choose("avx fma") is None and native.library() is None and int8.cpu_kernel() == fallback
    assert any("lacks avx2" in m for m in logs)
    if not native.missing("avx512-vnni"):
        assert choose(f"{avx512} avx2 fma avx_vnni") == "avx512-vnni"
    broken = dataclasses.replace(native.VARIANTS["avx512-vnni"], flags=("-mno-such-instruction-set",))
    env.setitem(native.VARIANTS, "avx512-vnni", broken)
    assert choose(f"{avx512} avx2 fma") == "avx2"
    assert any("could not build kaki's avx512-vnni" in m for m in logs)

    env.setenv("KAKI_INT8_VARIANT", "avx2-vnni")  # forced, but this "CPU" lacks it
    assert choose("avx2 fma") is None and int8.cpu_kernel() == fallback
    env.setenv("KAKI_INT8_KERNEL", "native")
    int8.cpu_kernel.cache_clear()
    with pytest.raises(KakiError, match="cannot be built"):
        int8.cpu_kernel()
    env.setenv("KAKI_INT8_VARIANT", "avx3")
    with pytest.raises(KakiError, match="KAKI_INT8_VARIANT must be one of avx512-vnni, avx2-vnni, avx2"):
        choose("avx2 fma")


@pytest.mark.parametrize("setting", ["CC=/nonexistent", "CC=false", "KAKI_NO_NATIVE=1"])
def test_falls_back_to_fbgemm_without_a_compiler_or_when_turned_off(env, tmp_path, setting):
    key, value = setting.split("=")
    env.setenv(key, value)
    fallback = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "weight-only"
    assert native.variant() is None and native.library() is None and int8.cpu_kernel() == fallback
    assert not list(tmp_path.rglob("*.so*"))
    layer = int8.Int8Linear(64, 32, bias=False)
    layer.set_float(torch.randn(32, 64), torch.device("cpu"))
    assert layer.kernel == fallback and layer.variant is None
    env.setenv("KAKI_INT8_KERNEL", "native")
    int8.cpu_kernel.cache_clear()
    with pytest.raises(KakiError, match="cannot be built"):
        int8.cpu_kernel()


# ----------------------------------------------------------------------------- the cache

@pytest.mark.parametrize("variant", variant_params())
def test_build_is_cached_per_variant(env, tmp_path, variant):
    assert native.library(variant) is not None
    built = list((tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left behind
    assert not built[0].stat().st_mode & 0o077 and not (tmp_path / "native").stat().st_mode & 0o077
    stamp = built[0].stat().st_mtime_ns
    native.cache_clear()
    assert native.library(variant) is not None and built[0].stat().st_mtime_ns == stamp  # reused


FAKE = r"""
#include <stdint.h>
int kaki_int8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale,
                     const int32_t *rowsum, const float *bias, int64_t N, float *y, int threads) {
    for (int64_t i = 0; i < M * N; i++) y[i] = 42.0f;
    return 0;
}
"""


def plant(path, content: bytes | None = None, mode=0o700):
    """A file at the kernel's cache path: `content`, or a working library that answers 42."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if content is None:
        src = path.with_name("fake.c")
        src.write_text(FAKE)
        subprocess.run([native._compiler(), "-shared", "-fPIC", str(src), "-o", str(path)], check=True)
        src.unlink()
    else:
        path.write_bytes(content)
    os.chmod(path, mode)


def computes_right(variant):
    x, q, scale, bias = problem(3, 40, 100)
    return torch.equal(native.int8_linear(x, q, scale, native.row_sums(q), bias, variant=variant),
                       exact(x, q, scale, bias))


@needs_any
@pytest.mark.parametrize("content", [b"", b"\x7fELF not really"], ids=["empty", "garbage"])
def test_empty_or_unloadable_cache_file_is_rebuilt(env, logs, content):
    """An interrupted write left behind used to mean fbgemm for good, silently."""
    variant = RUNNABLE[0]
    path = native.cache_path(variant, native._compiler())
    plant(path, content)
    assert native.library(variant) is not None and computes_right(variant)
    assert path.stat().st_size > 1000
    assert any(f"ignoring {path}" in m for m in logs)


@needs_any
def test_cache_file_others_could_write_is_not_loaded(env, logs):
    """A working library at the cache path, but writable by the group and everyone: it could be
    anyone's code, so it is replaced by a fresh build."""
    variant = RUNNABLE[0]
    path = native.cache_path(variant, native._compiler())
    plant(path, mode=0o666)
    assert native.library(variant) is not None and computes_right(variant)
    assert not path.stat().st_mode & 0o077
    assert any(f"ignoring {path}: not a regular file owned by this user" in m for m in logs)


@needs_any
def test_cache_owned_by_someone_else_is_not_used(env, tmp_path, logs):
    """A cache directory (and library in it) that belong to another user: the kernel is built in
    a private temporary directory instead, which is gone once the library is loaded, and their
    file is left alone. (Another user is simulated: this process claims a different uid.)"""
    variant = RUNNABLE[0]
    path = native.cache_path(variant, native._compiler())
    plant(path)
    before = path.read_bytes()
    private = tmp_path / "private"
    private.mkdir()
    env.setattr("tempfile.tempdir", str(private))
    env.setattr(os, "geteuid", lambda: os.getuid() + 4242)
    assert native.library(variant) is not None and computes_right(variant)
    assert path.read_bytes() == before and not list(private.iterdir())
    assert any("not a directory private to this user" in m for m in logs)


@needs_any
def test_cache_directory_made_group_writable_is_closed(env, tmp_path):
    """Our own cache directory with group write (a umask of 002): closed before anything in it
    is trusted; a library someone else put there would be theirs, or writable, and is refused."""
    d = tmp_path / "native"
    d.mkdir()
    os.chmod(d, 0o775)
    assert native.library(RUNNABLE[0]) is not None
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
