"""Prefix caching through HTTP: what a user of `kaki serve` sees with it on and off.

1. **A growing conversation.** One OpenAI client sends a 10-turn chat through
   /v1/chat/completions, re-sending the whole history each turn (as every OpenAI client does),
   about 150 tokens added per turn (a ~130-token user message and a 20-token reply). Prints the
   time to first token of every turn, with the cache and without (`--prefix-cache-mb 0`): without
   it turn 10 prefills the whole history, with it only the new turn. Target: turn 10 <= 1.3x turn 1.
2. **A shared system prompt.** 16 clients at once, each with the same ~1,000-token system prompt
   and its own short question, 16 tokens each: generated tokens/s over the burst's wall time, with
   and without the cache. Target: >= 1.5x.

Each setting runs against its own `kaki serve` process (a random Persimmon from
benchmarks/decode.py, so replies are random words; greedy, `ignore_eos`, fixed lengths).

    .venv/bin/python benchmarks/prefix_cache.py --random 1b      # the ~1B benchmark model
    .venv/bin/python benchmarks/prefix_cache.py --random quick   # a small one, to try the script
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("serve_bench", HERE / "serve.py")
serve_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_bench)


def words(rng: random.Random, n: int) -> str:
    """n tokens of the random model's word-level tokenizer (one word per id)."""
    return " ".join(f"w{rng.randrange(3, 30000)}" for _ in range(n))


def start(model_dir: Path, args, cache_mb: int) -> tuple[subprocess.Popen, str]:
    args.concurrency = "16"  # serve.py's start_server sizes the batch from it
    return serve_bench.start_server(model_dir, args, ("--prefix-cache-mb", str(cache_mb)))


MODEL_ID: dict[str, str] = {}  # server url -> the id /v1/models gives


def stream_chat(url: str, messages: list[dict], max_tokens: int) -> tuple[float, float, str]:
    """(time to first token, total time, reply text) of one streamed chat completion."""
    body = {"model": MODEL_ID[url], "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0, first, text = time.perf_counter(), None, []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"]
            piece = delta[0]["delta"].get("content") if delta else None
            if piece:
                first = first or time.perf_counter() - t0
                text.append(piece)
    return first or float("nan"), time.perf_counter() - t0, "".join(text)


def conversation(url: str, turns: int, user_tokens: int, reply_tokens: int) -> list[float]:
    rng = random.Random(0)
    messages, ttft = [], []
    for _ in range(turns):
        messages.append({"role": "user", "content": words(rng, user_tokens)})
        first, _, reply = stream_chat(url, messages, reply_tokens)
        ttft.append(first)
        messages.append({"role": "assistant", "content": reply})
    return ttft


def shared_system(url: str, clients: int, system_tokens: int, question_tokens: int, max_tokens: int) -> float:
    rng = random.Random(1)
    system = words(rng, system_tokens)
    questions = [words(rng, question_tokens) for _ in range(clients)]
    done = [0] * clients

    def client(i: int):
        _, _, reply = stream_chat(url, [{"role": "system", "content": system},
                                        {"role": "user", "content": questions[i]}], max_tokens)
        done[i] = len(reply.split())

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a model directory with a word-per-id tokenizer")
    src.add_argument("--random", choices=["quick", "1b"], help="a random Persimmon (benchmarks/serve.py)")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--user-tokens", type=int, default=130)
    ap.add_argument("--reply-tokens", type=int, default=20)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("KAKI_BENCH_DIR", "/tmp/kaki-bench")))
    args = ap.parse_args()
    model_dir = args.model or serve_bench.random_model(args.random, args.cache_dir)

    from kaki.cli.info import machine_line  # the CPU capability, as kaki info and the test header name it
    print(f"machine: {machine_line()}")
    print(f"model: {model_dir}  ({args.dtype}, 2 threads unless OMP_NUM_THREADS says otherwise)")
    results = {}
    for label, mb in (("cache on", 1024), ("cache off", 0)):
        proc, url = start(model_dir, args, mb)
        try:
            MODEL_ID[url] = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            stream_chat(url, [{"role": "user", "content": "w5 w6"}], 2)  # warm-up
            ttft = conversation(url, args.turns, args.user_tokens, args.reply_tokens)
            tps = shared_system(url, args.clients, args.system_tokens, 8, 16)
        finally:
            proc.terminate()
            proc.wait(30)
        results[label] = {"ttft": ttft, "shared_tps": tps}
        print(f"{label}: TTFT per turn (s) " + " ".join(f"{t:.2f}" for t in ttft)
              + f"; turn {args.turns}/turn 1 = {ttft[-1] / ttft[0]:.2f}x; {args.clients} clients with a shared "
                f"{args.system_tokens}-token system prompt: {tps:.1f} tokens/s")
    on, off = results["cache on"], results["cache off"]
    print(f"turn {args.turns} TTFT: {on['ttft'][-1]:.2f}s with the cache, {off['ttft'][-1]:.2f}s without "
          f"({off['ttft'][-1] / on['ttft'][-1]:.1f}x faster); turn {args.turns}/turn 1 with the cache: "
          f"{on['ttft'][-1] / on['ttft'][0]:.2f}x (target <= 1.3x)")
    print(f"shared system prompt: {on['shared_tps'] / off['shared_tps']:.2f}x the throughput without the cache "
          "(target >= 1.5x)")


if __name__ == "__main__":
    main()
