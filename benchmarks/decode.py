"""Decode speed: kaki against transformers on the same ~1B Persimmon-architecture model, one run.

Random weights (hidden 2048, 16 layers, 16 heads, intermediate 8192, vocab 32000), a 32-token
prompt, greedy, 64 new tokens, batch 1 and 8, float32 and bfloat16. Prints tokens/s for both and
their ratio, end-to-end (prefill + decode) and decode-only, plus two floors no implementation
beats here: a bare chain of the model's matrix products (each weight streamed once per token) and
the memory-bandwidth roofline (weight bytes per token / measured read bandwidth).

    .venv/bin/python benchmarks/decode.py [--quick] [--dtypes float32,bfloat16] [--batches 1,8]
                                          [--formats int8,int4]

--formats adds kaki's quantized models (kaki.load(..., quantize=FORMAT) on the float32 checkpoint)
in the same run, against transformers float32 and against `torch.ao.quantization.quantize_dynamic`
of transformers' model (every nn.Linear to fbgemm dynamic int8, the usual CPU recipe), with the
roofline of each format's weight bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
              vocab_size=32000, max_position_embeddings=2048)
QUICK = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
             vocab_size=32000, max_position_embeddings=2048)
PROMPT, NEW = 32, 64


def make_checkpoint(root: Path, dtype: str, cfg: dict) -> Path:
    """Write the random model once per dtype (cached between runs)."""
    import transformers as T

    tag = "x".join(str(cfg[k]) for k in ("hidden_size", "num_hidden_layers"))
    out = root / f"persimmon-{tag}-{dtype}"
    if (out / "config.json").is_file():
        return out
    torch.manual_seed(0)
    config = T.PersimmonConfig(**cfg, bos_token_id=1, eos_token_id=2)
    model = T.PersimmonForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    del model
    gc.collect()
    return out


def hf_run(model, batch: int, prompt: torch.Tensor) -> dict:
    from transformers import DynamicCache

    ids = prompt[:batch]
    mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kw)
        e2e = time.perf_counter() - t0
        # Decode-only: transformers' own cached loop, one token at a time, after a prefill.
        cache = DynamicCache()
        t0 = time.perf_counter()
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
        prefill = time.perf_counter() - t0
        tok = logits[:, -1].argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(NEW - 1):
            logits = model(tok, past_key_values=cache, logits_to_keep=1).logits
            tok = logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t0
    return {"e2e_tok_s": batch * NEW / e2e, "decode_tok_s": batch * (NEW - 1) / decode,
            "prefill_s": prefill, "tokens": out[:, PROMPT:].tolist()}


def kaki_run(model, batch: int, prompt: torch.Tensor) -> dict:
    from kaki.engine import Scheduler
    from kaki.sampling import SamplingParams

    ids = prompt[:batch].tolist()
    sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    # The engine LLM.generate runs, without a prefix cache: every run prefills its whole prompt.
    t0 = time.perf_counter()
    sched = Scheduler(model, [], max_rows=batch)
    seqs = [sched.sequence(sched.add_request(p, sp)) for p in ids]
    sched.step()  # the prefill and each row's first token
    t_first = time.perf_counter()
    while sched.has_work:
        sched.step()
    end = time.perf_counter()
    tokens = [s.tokens for s in seqs]
    return {"e2e_tok_s": batch * NEW / (end - t0), "decode_tok_s": batch * (NEW - 1) / (end - t_first),
            "prefill_s": t_first - t0, "tokens": tokens}


def print_small_m(model) -> None:
    """The small-M products the model's warm-up chose (or read from the cache), once per model."""
    plan = getattr(model, "_kaki_small_m", None)
    if plan is not None and not getattr(model, "_bench_plan_shown", False):
        model._bench_plan_shown = True
        print(f"small-M plan ({plan.source}): {plan.describe()}; decode steps on one core at rows "
              f"{sorted(plan.one_thread_rows) or 'none'}")


def best(runs: list[dict]) -> dict:
    """Best of several runs per figure: the machine is shared, and contention only ever slows."""
    out = {k: max(r[k] for r in runs) for k in ("e2e_tok_s", "decode_tok_s")}
    out["prefill_s"] = min(r["prefill_s"] for r in runs)
    out["tokens"] = runs[0]["tokens"]
    return out


def bare_chain(cfg: dict, dtype: torch.dtype, batch: int) -> float:
    """Tokens/s of just the weight matmuls of one decode step (no attention, norms or Python)."""
    h, i, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    ws = [(torch.randn(3 * h, h, dtype=dtype), torch.randn(h, h, dtype=dtype),
           torch.randn(i, h, dtype=dtype), torch.randn(h, i, dtype=dtype)) for _ in range(L)]
    head = torch.randn(V, h, dtype=dtype)
    x = torch.randn(batch, h, dtype=dtype)

    def step():
        y = x
        for qkv, dense, up, down in ws:
            F.linear(y, qkv)
            y = F.linear(y, dense)
            y = F.linear(torch.relu(F.linear(y, up)), down)
        F.linear(y, head)

    step()
    t0 = time.perf_counter()
    n = 5
    for _ in range(n):
        step()
    per = (time.perf_counter() - t0) / n
    del ws, head
    gc.collect()
    return batch / per


def read_bandwidth() -> float:
    """GB/s of a 2-thread streaming read (sum over 1 GiB), the best of 10: on a shared machine
    contention only ever slows a read, so an average would understate the roofline."""
    a = torch.ones(2**28, dtype=torch.float32)
    a.sum()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def peak_load_rss(path: Path, dtype: str) -> dict:
    """Load in a fresh process and read its peak RSS against the weights' bytes."""
    code = f"""
import resource, torch, json
from pathlib import Path
from kaki.config import read_config
from kaki.loading import load_model
def rss(): return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0]) * 1024
base = rss()
m = load_model(Path({str(path)!r}), read_config({str(path)!r}), torch.{dtype}, torch.device('cpu'))
for p in m.parameters(): p.data.sum()  # touch every weight (mmapped pages count once touched)
w = sum(p.numel() * p.element_size() for p in m.parameters())
peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
print(json.dumps(dict(base=base, peak=peak, weights=w)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["ratio"] = (r["peak"] - r["base"]) / r["weights"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model, to check the script works")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--cache-dir", default=os.environ.get("KAKI_BENCH_DIR", "/tmp/kaki-bench"))
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per case; the best is kept")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--formats", default="", help="quantized formats to add, e.g. int8,int4 (int4:GROUP; "
                                                 "int8@fbgemm-8bit etc. for another int8 kernel)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else CONFIG
    root = Path(args.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    prompt = torch.randint(3, cfg["vocab_size"], (8, PROMPT))
    from kaki.cli.info import machine_line
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(machine_line())  # the int8 kernel build, small-M setting and bf16 support this run measured
    bw = read_bandwidth()
    results = {"bandwidth_gb_s": bw, "runs": []}
    print(f"read bandwidth: {bw:.1f} GB/s")
    for dname in [d for d in args.dtypes.split(",") if d]:  # "" = only the quantized formats
        dtype = getattr(torch, dname)
        path = make_checkpoint(root, dname, cfg)
        from kaki.config import read_config
        c = read_config(path)
        streamed = c.num_parameters() - c.vocab_size * c.hidden_size  # all but the embedding table
        roof = bw * 1e9 / (streamed * dtype.itemsize)
        rss = peak_load_rss(path, dname)
        print(f"\n== {dname}: {c.num_parameters() / 1e6:.0f}M params; load peak RSS "
              f"{(rss['peak'] - rss['base']) / 1e9:.2f} GB over {rss['weights'] / 1e9:.2f} GB of weights "
              f"({rss['ratio']:.2f}x)")
        import transformers as T

        from kaki.loading import load_model
        hf_model = T.PersimmonForCausalLM.from_pretrained(path, dtype=dtype).eval()
        kaki_model = load_model(path, c, dtype, torch.device("cpu"))
        for b in [int(x) for x in args.batches.split(",")]:
            chain = bare_chain(cfg, dtype, b)
            hf_runs, kaki_runs = [], []
            for rep in range(args.repeats + 1):  # the first round warms both up at these shapes
                h, k = hf_run(hf_model, b, prompt), kaki_run(kaki_model, b, prompt)
                if rep:
                    hf_runs.append(h)
                    kaki_runs.append(k)
            hf, kk = best(hf_runs), best(kaki_runs)
            print_small_m(kaki_model)
            same = sum(x == y for x, y in zip(hf["tokens"], kk["tokens"]))
            row = dict(dtype=dname, batch=b, hf=hf, kaki=kk, chain_tok_s=chain, roofline_tok_s=roof * b,
                       same_tokens_rows=same)
            for r in (hf, kk):
                r.pop("tokens")
            results["runs"].append(row)
            print(f"batch {b}: end-to-end kaki {kk['e2e_tok_s']:.2f} tok/s vs transformers "
                  f"{hf['e2e_tok_s']:.2f} ({kk['e2e_tok_s'] / hf['e2e_tok_s']:.2f}x); decode-only "
                  f"{kk['decode_tok_s']:.2f} vs {hf['decode_tok_s']:.2f} "
                  f"({kk['decode_tok_s'] / hf['decode_tok_s']:.2f}x); prefill {kk['prefill_s'] * 1e3:.0f} ms vs "
                  f"{hf['prefill_s'] * 1e3:.0f} ms; bare chain {chain:.2f} tok/s; roofline "
                  f"{roof:.2f} tok/s per sequence; greedy rows identical {same}/{b}", flush=True)
        del hf_model, kaki_model
        gc.collect()
    if args.formats:
        results["formats"] = run_formats(args, cfg, root, prompt, bw, results["runs"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def load_format(path: Path, fmt: str):
    """kaki's model quantized while loading, as kaki.load(path, quantize=FORMAT) builds it (the
    random checkpoint has no tokenizer); "int8@KERNEL" picks an int8 kernel (KAKI_INT8_KERNEL)."""
    from kaki.config import read_config
    from kaki.loading import load_model
    from kaki.quant import as_spec, int8

    fmt, _, kernel = fmt.partition("@")
    old = os.environ.get("KAKI_INT8_KERNEL")
    if kernel:
        os.environ["KAKI_INT8_KERNEL"] = kernel
    int8.cpu_kernel.cache_clear()
    try:
        return load_model(path, read_config(path), torch.float32, torch.device("cpu"), quantize=as_spec(fmt, True))
    finally:
        os.environ.pop("KAKI_INT8_KERNEL", None)
        if old is not None:
            os.environ["KAKI_INT8_KERNEL"] = old
        int8.cpu_kernel.cache_clear()


def run_formats(args, cfg: dict, root: Path, prompt: torch.Tensor, bw: float, float_runs: list[dict]) -> list[dict]:
    """kaki int8/int4 vs transformers fp32 and transformers + quantize_dynamic, same prompts."""
    import warnings

    import transformers as T

    from kaki.config import read_config
    from kaki.quant import as_spec, weight_bytes

    path = make_checkpoint(root, "float32", cfg)
    c = read_config(path)
    embed = c.vocab_size * c.hidden_size
    formats = [f for f in args.formats.split(",") if f]
    hf32 = T.PersimmonForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice; it still works in 2.13
        hf_dyn = torch.ao.quantization.quantize_dynamic(
            T.PersimmonForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), {torch.nn.Linear},
            dtype=torch.qint8)
    models = {f: load_format(path, f) for f in formats}
    print(f"\n== quantized formats ({', '.join(formats)}) on the float32 checkpoint; kernels: "
          + ", ".join(f"{f} {sorted({getattr(m, 'kernel', '') for m in mod.modules() if hasattr(m, 'kernel')})}"
                      for f, mod in models.items()), flush=True)
    out = []
    for b in [int(x) for x in args.batches.split(",")]:
        prior = [r for r in float_runs if r["dtype"] == "float32" and r["batch"] == b]
        runs: dict[str, list[dict]] = {"hf_fp32": [], "hf_dynamic_int8": [], **{f: [] for f in formats}}
        for rep in range(args.repeats + 1):
            if not prior:
                h = hf_run(hf32, b, prompt)
            d = hf_run(hf_dyn, b, prompt)
            ks = {f: kaki_run(m, b, prompt) for f, m in models.items()}
            if rep:
                if not prior:
                    runs["hf_fp32"].append(h)
                runs["hf_dynamic_int8"].append(d)
                for f, k in ks.items():
                    runs[f].append(k)
        best_runs = {k: best(v) for k, v in runs.items() if v}
        hf_fp32 = prior[0]["hf"] if prior else best_runs["hf_fp32"]
        dyn = best_runs["hf_dynamic_int8"]
        row = {"batch": b, "hf_fp32": {k: v for k, v in hf_fp32.items() if k != "tokens"},
               "hf_dynamic_int8": {k: v for k, v in dyn.items() if k != "tokens"}}
        print(f"batch {b}: transformers fp32 {hf_fp32['e2e_tok_s']:.2f} tok/s end-to-end "
              f"({hf_fp32['decode_tok_s']:.2f} decode-only); transformers + quantize_dynamic "
              f"{dyn['e2e_tok_s']:.2f} ({dyn['decode_tok_s']:.2f})", flush=True)
        for f in formats:
            k = best_runs[f]
            streamed = weight_bytes(c, as_spec(f.partition("@")[0]), float_bytes=4) - embed * 4
            roof = bw * 1e9 / streamed
            same = sum(x == y for x, y in zip(k["tokens"], dyn["tokens"]))
            row[f] = {**{key: v for key, v in k.items() if key != "tokens"}, "roofline_tok_s": roof * b,
                      "streamed_bytes": streamed, "same_rows_as_hf_dynamic": same}
            print(f"  kaki {f}: {k['e2e_tok_s']:.2f} tok/s end-to-end = {k['e2e_tok_s'] / hf_fp32['e2e_tok_s']:.2f}x "
                  f"transformers fp32, {k['e2e_tok_s'] / dyn['e2e_tok_s']:.2f}x quantize_dynamic; decode-only "
                  f"{k['decode_tok_s']:.2f} tok/s = {k['decode_tok_s'] / b / roof:.0%} of the {f} roofline "
                  f"({roof:.1f} tok/s per sequence, {streamed / 1e9:.2f} GB/token); prefill "
                  f"{k['prefill_s'] * 1e3:.0f} ms; greedy rows equal to quantize_dynamic's {same}/{b}", flush=True)
        out.append(row)
    by_batch = {r["batch"]: r for r in out}
    if 1 in by_batch and 8 in by_batch:
        for f in formats:
            ratio = by_batch[8][f]["e2e_tok_s"] / by_batch[1][f]["e2e_tok_s"]
            print(f"kaki {f}: batch 8 throughput = {ratio:.2f}x batch 1 (end-to-end)")
    return out


if __name__ == "__main__":
    main()
