"""Serving load test: `kaki serve` on loopback, C concurrent streaming clients, N requests each level.

Starts `kaki serve --model DIR` in a subprocess (or uses --url), then for each concurrency C sends
requests from C client threads (greedy, `ignore_eos`, a fixed prompt and reply length, streamed
over SSE) and prints: throughput (generated tokens/s over the level's wall time), time to first
token and inter-token latency percentiles (p50/p95). Bounded in count (--requests per level,
default 2*C) and time (--time-limit per level; no new request starts after it).

The baseline is `kaki generate`'s loop alone at batch 1 on the same prompt and reply length, run
in this process before the server starts (the server at C=1 should come close to it).

    .venv/bin/python benchmarks/serve.py --model DIR [--concurrency 1,4,16] [--max-tokens 64]
    .venv/bin/python benchmarks/serve.py --random quick     # a random model, to try the script
    .venv/bin/python benchmarks/serve.py --random 1b        # benchmarks/decode.py's ~1B model

--random writes a random Persimmon (benchmarks/decode.py's configs) with a word-level tokenizer
covering its vocabulary to --cache-dir once, so any sampled id decodes.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def random_model(size: str, root: Path) -> Path:
    """decode.py's random Persimmon plus a tokenizer.json of one word per id."""
    spec = importlib.util.spec_from_file_location("decode_bench", HERE / "decode.py")
    decode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decode)
    cfg = dict(decode.CONFIG if size == "1b" else decode.QUICK)
    path = decode.make_checkpoint(root, "float32", cfg)
    if not (path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, models, pre_tokenizers

        vocab = {f"w{i}": i for i in range(cfg["vocab_size"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tmp = path / "tokenizer.json.tmp"
        tmp.write_text(tok.to_str())
        os.replace(tmp, path / "tokenizer.json")
    return path


def prompt_text(model_dir: Path, n_tokens: int, seed: int) -> str:
    """A prompt of about `n_tokens` tokens: words of the model's own vocabulary."""
    from kaki.config import read_config
    from kaki.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(model_dir, read_config(model_dir))
    rng = random.Random(seed)
    ids = [rng.randrange(3, min(tok.vocab_size, 30000)) for _ in range(n_tokens)]
    return tok.decode(ids)


def baseline(model_dir: Path, prompt: str, max_tokens: int, dtype: str, repeats: int) -> float:
    """Tokens/s of kaki's generation loop alone, batch 1, end to end (prefill included)."""
    import kaki

    llm = kaki.load(model_dir, dtype=dtype, device="cpu")
    best = 0.0
    for _ in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        c = llm.generate(prompt, max_new_tokens=max_tokens, temperature=0.0, ignore_eos=True)[0]
        best = max(best, len(c.token_ids) / (time.perf_counter() - t0))
    del llm
    gc.collect()
    return best


def one_request(url: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps, tokens = [], 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"]:
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ttft": stamps[0] - t0 if stamps else None, "gaps": gaps, "tokens": tokens, "e2e": end - t0}


def run_level(url: str, prompt: str, concurrency: int, n_requests: int, max_tokens: int, time_limit: float) -> dict:
    results: list[dict] = []
    lock = threading.Lock()
    counter = iter(range(n_requests))
    start = time.perf_counter()

    def client():
        while time.perf_counter() - start < time_limit:
            with lock:
                if next(counter, None) is None:
                    return
            r = one_request(url, prompt, max_tokens)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50": _pct(ttft, 50), "ttft_p95": _pct(ttft, 95),
            "itl_p50": _pct(gaps, 50), "itl_p95": _pct(gaps, 95)}


def _pct(xs: list[float], q: int) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


def start_server(model_dir: Path, args, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`kaki serve` on a free loopback port (`extra`: more flags), once /health answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "kaki", "serve", "--model", str(model_dir), "--port", str(port),
           "--dtype", args.dtype, "--device", "cpu", "--max-seq-len", str(args.max_seq_len),
           "--max-batch-size", str(max(int(c) for c in args.concurrency.split(","))), "--log-level", "warning",
           *extra]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"kaki serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit("kaki serve did not come up in 10 minutes")
        time.sleep(0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="model directory to serve")
    src.add_argument("--random", choices=["quick", "1b"], help="a random Persimmon (see above)")
    ap.add_argument("--url", help="benchmark this running server instead of starting one")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default 2*C)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per level")
    ap.add_argument("--repeats", type=int, default=1, help="baseline runs (best kept)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("KAKI_BENCH_DIR", "/tmp/kaki-bench")))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    model_dir = args.model or random_model(args.random, args.cache_dir)
    prompt = prompt_text(model_dir, args.prompt_tokens, seed=0)
    out = {"model": str(model_dir), "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
           "max_tokens": args.max_tokens, "levels": []}
    if not args.no_baseline:
        out["baseline_tok_s"] = baseline(model_dir, prompt, args.max_tokens, args.dtype, args.repeats)
        print(f"kaki generate alone, batch 1: {out['baseline_tok_s']:.2f} tok/s")
    proc, url = (None, args.url) if args.url else start_server(model_dir, args)
    try:
        one_request(url, prompt, 4)  # warm-up
        print(f"{'C':>3} {'reqs':>5} {'tokens':>7} {'tok/s':>8} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} {'p95':>7}")
        for c in [int(x) for x in args.concurrency.split(",")]:
            level = run_level(url, prompt, c, args.requests or 2 * c, args.max_tokens, args.time_limit)
            out["levels"].append(level)
            print(f"{c:>3} {level['requests']:>5} {level['tokens']:>7} {level['tok_s']:>8.2f} "
                  f"{level['ttft_p50']:>8.3f}s {level['ttft_p95']:>6.3f}s {level['itl_p50'] * 1e3:>6.1f}ms "
                  f"{level['itl_p95'] * 1e3:>5.1f}ms", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    levels = {lv["concurrency"]: lv for lv in out["levels"]}
    if 1 in levels:
        for c, lv in levels.items():
            if c != 1:
                print(f"throughput C={c} / C=1: {lv['tok_s'] / levels[1]['tok_s']:.2f}x")
        if "baseline_tok_s" in out:
            print(f"C=1 / kaki generate alone: {levels[1]['tok_s'] / out['baseline_tok_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
