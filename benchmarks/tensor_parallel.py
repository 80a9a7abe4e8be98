"""Tensor parallelism on CPU: per-rank memory and decode tokens/s at 1 and 2 ranks, and what the
ranks spend talking to each other per token.

The ~1B random Persimmon of benchmarks/decode.py (hidden 2048, 16 layers, 16 heads, vocab 32000),
float32, a 32-token prompt, greedy, 64 new tokens, batch 1 (and 8). Each size runs as one torchrun
job serving as `kaki serve --tensor-parallel N` does: rank 0 runs the scheduler and sends each step
to the others (kaki.engine.mirror); the model's all-reduces and the logits' all-gather are timed on
every rank, and so are rank 0's step messages. The cores are split between the ranks (2 cores: one
thread each at 2 ranks, two at 1 rank).

On 2 cores sharing one memory bus, 2 ranks cannot be faster than 1: what carries over to GPUs is the
communication per token (collectives per token, their bytes and time). The time in a collective
includes waiting for the slower rank, so it bounds the overhead from above.

    .venv/bin/python benchmarks/tensor_parallel.py [--quick] [--ranks 1,2] [--batches 1,8]

--quick: decode.py's small model (hidden 512, 4 layers), to check the script works.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

PROMPT, NEW = 32, 64
HERE = Path(__file__).resolve().parent


def decode_module():
    """benchmarks/decode.py: the same model configs and checkpoint cache."""
    spec = importlib.util.spec_from_file_location("bench_decode", HERE / "decode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rss() -> int:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


# ---------------------------------------------------------------------- one rank (under torchrun)


def held_bytes(model) -> int:
    """Bytes of the parameters and buffers this rank holds (a tied tensor counted once)."""
    tensors = {t.data_ptr(): t for t in model.state_dict(keep_vars=True).values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Timed:
    """Wall time and count of calls to a function, on this rank."""

    def __init__(self, fn):
        self.fn, self.seconds, self.calls, self.bytes = fn, 0.0, 0, 0

    def __get__(self, obj, owner=None):  # a method of the class it replaces one of
        return functools.partial(self, obj)

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        x = args[1] if len(args) > 1 else None  # (self, tensor, ...) for the model's collectives
        if isinstance(x, torch.Tensor):
            self.bytes += x.numel() * x.element_size()
        return out

    def take(self) -> dict:
        out = {"seconds": self.seconds, "calls": self.calls, "bytes": self.bytes}
        self.seconds, self.calls, self.bytes = 0.0, 0, 0
        return out


def run_rank(spec: dict) -> None:
    import torch.distributed as dist

    from kaki.config import read_config
    from kaki.engine import Scheduler, mirror
    from kaki.engine.mirror import Leader
    from kaki.loading import load_model
    from kaki.sampling import SamplingParams
    from kaki.tp import TensorParallel, start

    # The model's collectives and rank 0's step messages, timed where they are called.
    timers = {"all_reduce": Timed(TensorParallel.all_reduce), "gather_vocab": Timed(TensorParallel.gather_vocab),
              "step_message": Timed(Leader._send)}
    TensorParallel.all_reduce, TensorParallel.gather_vocab = timers["all_reduce"], timers["gather_vocab"]
    Leader._send = timers["step_message"]
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    path = Path(spec["path"])
    cfg = read_config(path)
    base = rss()
    tp, dev = start(ranks, torch.device("cpu"))
    model = load_model(path, cfg, torch.float32, dev, tp=tp)
    out = {"rank": int(os.environ.get("RANK", "0")), "ranks": ranks, "threads": torch.get_num_threads(),
           "weight_bytes": held_bytes(model), "load_rss": rss() - base, "runs": []}
    if mirror.start(SimpleNamespace(model=model)):
        prompt = torch.randint(3, cfg.vocab_size, (max(spec["batches"]), PROMPT),
                               generator=torch.Generator().manual_seed(0)).tolist()
        sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
        for batch in spec["batches"]:
            best = None
            for rep in range(spec["repeats"] + 1):  # the first round warms up at these shapes
                sched = Scheduler(model, [], max_rows=batch)
                seqs = [sched.sequence(sched.add_request(p, sp)) for p in prompt[:batch]]
                sched.step()  # the prefill and each row's first token
                for t in timers.values():
                    t.take()
                t0 = time.perf_counter()
                steps = 0
                while sched.has_work:
                    sched.step()
                    steps += 1
                decode = time.perf_counter() - t0
                run = {"batch": batch, "decode_tok_s": batch * (NEW - 1) / decode, "steps": steps,
                       "tokens": [s.tokens for s in seqs], **{k: t.take() for k, t in timers.items()}}
                if rep and (best is None or run["decode_tok_s"] > best["decode_tok_s"]):
                    best = run
                del sched
            out["runs"].append(best)
        mirror.stop(SimpleNamespace(model=model))
    Path(spec["out"], f"rank{out['rank']}.json").write_text(json.dumps(out))
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- the launcher


def launch(path: Path, ranks: int, args, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    spec = {"path": str(path), "out": str(out), "batches": [int(b) for b in args.batches.split(",")],
            "repeats": args.repeats}
    (out / "spec.json").write_text(json.dumps(spec))
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           str(Path(__file__).resolve()), "--worker", str(out / "spec.json")]
    subprocess.run(cmd, env=env, check=True, timeout=args.timeout)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def per_token(run: dict, key: str, field: str) -> float:
    return run[key][field] / (run["batch"] * (NEW - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small model, to check the script works")
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per case; the best is kept")
    ap.add_argument("--cache-dir", default=os.environ.get("KAKI_BENCH_DIR", "/tmp/kaki-bench"))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one torchrun job may take")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_rank(json.loads(Path(args.worker).read_text()))
    decode = decode_module()
    cfg = decode.QUICK if args.quick else decode.CONFIG
    root = Path(args.cache_dir)
    path = decode.make_checkpoint(root, "float32", cfg)
    from kaki.cli.info import machine_line
    print(f"{machine_line()}\nmodel: {path.name} (float32), prompt {PROMPT}, {NEW} new tokens, greedy")
    results, base = {}, None
    for ranks in [int(r) for r in args.ranks.split(",")]:
        per_rank = launch(path, ranks, args, root / f"tp-{path.name}-{ranks}")
        results[ranks] = per_rank
        r0 = per_rank[0]
        base = base or r0
        mem = ", ".join(f"rank {r['rank']}: weights {r['weight_bytes'] / 1e9:.3f} GB "
                        f"({r['weight_bytes'] / base['weight_bytes']:.2f}x of {base['ranks']} rank(s)), load RSS "
                        f"{r['load_rss'] / 1e9:.3f} GB" for r in per_rank)
        print(f"\n== {ranks} rank(s), {r0['threads']} thread(s) each: {mem}")
        for run, first in zip(r0["runs"], base["runs"]):
            line = f"batch {run['batch']}: decode {run['decode_tok_s']:.2f} tok/s"
            if run is not first:
                same = run["tokens"] == first["tokens"]
                line += (f" ({run['decode_tok_s'] / first['decode_tok_s']:.2f}x of {base['ranks']} rank(s)), greedy "
                         f"tokens {'identical' if same else 'DIFFERENT'}")
            if ranks > 1:
                ms = 1e3 * sum(per_token(run, k, "seconds") for k in ("all_reduce", "gather_vocab"))
                calls = sum(run[k]["calls"] for k in ("all_reduce", "gather_vocab")) / run["steps"]
                kb = sum(per_token(run, k, "bytes") for k in ("all_reduce", "gather_vocab")) / 1e3
                msg = 1e3 * per_token(run, "step_message", "seconds")
                line += (f"; per token on rank 0: {ms:.2f} ms in {calls:.0f} collectives per step ({kb:.0f} kB "
                         f"sent per rank), step message {msg:.2f} ms")
            print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
