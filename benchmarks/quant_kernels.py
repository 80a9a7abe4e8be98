"""Linear-layer kernels for quantized weights on this CPU: the measurements behind kaki.quant's
choice of kernels (docs/quantization.md).

For each weight shape and row count M (1 = batch-1 decode, 8 = batch-8 decode, 32+ = prompts),
every candidate runs interleaved with the others, round after round, and the best time of each
is kept (the machine may be shared; contention only ever slows a run down):

- fp32 / bf16 `F.linear`, and kaki's fp32 linear (kaki.kernels: rows split across cores);
- int8: kaki's Int8Linear with its own kernel (native: 16-bit activations per row; every build
  of it this CPU runs: avx512-vnni, avx2-vnni, avx2) and with fbgemm (two-row 15-bit
  activations), fbgemm's dynamic op as `quantize_dynamic` runs it (8-bit activations), oneDNN's
  dynamic op, PyTorch's weight-only `_weight_int8pack_mm` (bf16 activations);
- int4: kaki's Int4Linear (`_weight_int4pack_mm_for_cpu`, bf16 activations) at groups 32/64/128.

    .venv/bin/python benchmarks/quant_kernels.py [--shapes 16384x4096,4096x16384] [--rows 1,8,32]
    .venv/bin/python benchmarks/quant_kernels.py --shapes 6144x2048,2048x2048,8192x2048,2048x8192 \
        --stream 16 --rows 1,8 --rounds 10      # the ~1B model's decode step, from memory
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import torch
import torch.nn.functional as F


def candidates(N: int, K: int) -> dict:
    from kaki.errors import KakiError
    from kaki.kernels import linear as kaki_linear
    from kaki import native
    from kaki.quant import int4, int8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    wb = w.bfloat16()
    layers = {}
    for kernel, variant in [("native", v) for v in native.VARIANTS if not native.missing(v)] + [("fbgemm", "")]:
        try:
            os.environ["KAKI_INT8_KERNEL"], os.environ["KAKI_INT8_VARIANT"] = kernel, variant
            native.cache_clear()
            int8.cpu_kernel.cache_clear()
            layer = int8.Int8Linear(K, N, bias=False)
            layer.set_float(w, torch.device("cpu"))
            layers[f"native {variant}" if variant else "fbgemm two-row"] = layer
        except KakiError:  # this build does not compile here
            pass
        finally:
            os.environ.pop("KAKI_INT8_KERNEL", None)
            os.environ.pop("KAKI_INT8_VARIANT", None)
            native.cache_clear()
            int8.cpu_kernel.cache_clear()
    q, scale = int8.quantize(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onednn = int8._prepack(q, scale, "onednn")
        fbgemm = int8._prepack(q, scale, "fbgemm")  # whole, as quantize_dynamic packs it
    sb = scale.bfloat16()
    out = {
        "fp32 F.linear": lambda x, xb: F.linear(x, w),
        "fp32 kaki": lambda x, xb: kaki_linear(x, w, None),
        "bf16 F.linear": lambda x, xb: F.linear(xb, wb),
        **{f"int8 kaki ({k})": (lambda m: lambda x, xb: m(x))(m) for k, m in layers.items()},
        "int8 fbgemm dynamic": lambda x, xb: torch.ops.quantized.linear_dynamic(x, fbgemm, True),
        "int8 onednn dynamic": lambda x, xb: torch.ops.quantized.linear_dynamic(x, onednn, False),
        "int8 _weight_int8pack_mm": lambda x, xb: torch._weight_int8pack_mm(xb, q, sb),
    }
    for group in (32, 64, 128):
        if K % group == 0:
            m = int4.Int4Linear(K, N, bias=False, group=group)
            m.set_float(w, torch.device("cpu"))
            out[f"int4 kaki G{group}"] = (lambda m: lambda x, xb: m(xb))(m)
    return out


def interleaved(fns: dict, rows: list[int], rounds: int, inputs) -> dict:
    """{name: {M: best seconds}}: every candidate called once per round and row count, in turn, on
    `inputs(M)`'s arguments; round 0 warms every kernel up and is not counted."""
    best = {name: {M: float("inf") for M in rows} for name in fns}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for M in rows:
                args = inputs(M)
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f(*args)
                    if r:
                        best[name][M] = min(best[name][M], time.perf_counter() - t0)
    return best


def measure(N: int, K: int, rows: list[int], rounds: int) -> dict:
    xs = {M: (torch.randn(M, K), torch.randn(M, K).bfloat16()) for M in rows}
    return interleaved(candidates(N, K), rows, rounds, xs.__getitem__)


def stream(shapes: list[tuple[int, int]], copies: int, rows: list[int], rounds: int) -> dict:
    """A decode step's weight traffic: every shape `copies` times, each its own weight, called in
    turn, so each layer comes from memory as in a model's step (the ~1B model's is 0.87 GB of int8,
    far past any L3; one layer timed alone may sit in the cache). kaki's int8 layer (the kernel in
    use here) against fbgemm's dynamic op as quantize_dynamic runs it, interleaved round by round."""
    from kaki.quant import int8

    kaki_layers, fbgemm = [], []
    for _ in range(copies):
        for N, K in shapes:
            w = torch.randn(N, K) * K ** -0.5
            layer = int8.Int8Linear(K, N, bias=False)
            layer.set_float(w, torch.device("cpu"))
            kaki_layers.append(layer)
            q, scale = int8.quantize(w)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fbgemm.append((int8._prepack(q, scale, "fbgemm"), K))
    name = f"int8 kaki ({kaki_layers[0].kernel}{' ' + kaki_layers[0].variant if kaki_layers[0].variant else ''})"
    fns = {name: lambda xs: [m(xs[m.in_features]) for m in kaki_layers],
           "int8 fbgemm dynamic": lambda xs: [torch.ops.quantized.linear_dynamic(xs[K], p, True) for p, K in fbgemm]}
    return interleaved(fns, rows, rounds, lambda M: ({K: torch.randn(M, K) for _, K in shapes},))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="16384x4096,4096x16384,6144x2048,8192x2048",
                    help="weights as NxK (out x in): Persimmon-8B's MLP, the ~1B benchmark model's")
    ap.add_argument("--rows", default="1,4,8,32")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--stream", type=int, default=0, metavar="COPIES",
                    help="instead: all the shapes COPIES times over as one pass from memory, int8 only "
                         "(16 with the ~1B model's four shapes is its decode step)")
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, VNNI {torch.cpu._is_vnni_supported()}, "
          f"{os.cpu_count()} cores; best of {args.rounds} interleaved rounds, ms")
    results = {}
    if args.stream:
        shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
        gb = args.stream * sum(N * K for N, K in shapes) / 1e9
        best = stream(shapes, args.stream, rows, args.rounds)
        print(f"\n{args.shapes} x {args.stream}: {gb:.2f} GB of int8 weights per pass; ms (GB/s)")
        for name, by_m in best.items():
            print(f"{name:30s}" + "".join(f"{by_m[M] * 1e3:10.1f} ({gb / by_m[M]:4.1f})" for M in rows), flush=True)
        results["stream"] = best
    for shape in ([] if args.stream else args.shapes.split(",")):
        N, K = (int(v) for v in shape.split("x"))
        best = measure(N, K, rows, args.rounds)
        results[shape] = best
        print(f"\n{N}x{K} (out x in): fp32 {N * K * 4 / 1e6:.0f} MB, int8 {N * K / 1e6:.0f} MB")
        print(f"{'kernel':30s}" + "".join(f"{'M=' + str(M):>10s}" for M in rows))
        for name, by_m in best.items():
            print(f"{name:30s}" + "".join(f"{by_m[M] * 1e3:10.3f}" for M in rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
