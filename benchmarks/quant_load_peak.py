"""Peak memory of loading Persimmon-8B with `--quantize int8`, measured, not estimated.

Writes a synthetic checkpoint with Persimmon-8B's real shapes (adept/persimmon-8b-base: hidden
4096, 36 layers, 64 heads, intermediate 16384, vocab 262144) in bf16: 18.8 GB of random values,
streamed to disk tensor by tensor in blocks of rows (never a whole tensor in memory), sharded as
transformers shards, with a small sentencepiece tokenizer. Then runs, in a fresh process,

    kaki.load(DIR, quantize="int8", dtype="bfloat16") and two greedy tokens

(the loading `kaki generate --quantize int8` does, feeding token ids to the engine: a random
model's ids need not exist in the small synthetic tokenizer) under `/usr/bin/time -v` (or a
small Python wrapper reading getrusage where `time` is missing)
and reports its peak RSS: every page the process ever had resident, mmapped checkpoint pages
included. The target: under 12 GB (the int8 model itself is 10.5 GB: 8.3 GB of int8 linear
layers and lm_head, 2.1 GB of bf16 input embedding).

    .venv/bin/python benchmarks/quant_load_peak.py [--dir /tmp/persimmon-8b-synthetic] [--keep]

It needs ~20 GB of free disk (checked first) and a few minutes; the checkpoint is deleted
afterwards unless --keep. tests/test_quant_load.py runs the same check on a small model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

PERSIMMON_8B = dict(model_type="persimmon", architectures=["PersimmonForCausalLM"], vocab_size=262144,
                    hidden_size=4096, intermediate_size=16384, num_hidden_layers=36, num_attention_heads=64,
                    max_position_embeddings=16384, hidden_act="relu2", layer_norm_eps=1e-5,
                    qk_layernorm=True, partial_rotary_factor=0.5, rope_theta=25000.0,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
SHARD_BYTES = 5 * 2**30
BLOCK_ELEMENTS = 1 << 24  # random values generated per write: 32 MB of bf16


def checkpoint_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Persimmon checkpoint, in transformers' names."""
    h, i, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    out = [("model.embed_tokens.weight", (V, h))]
    for n in range(L):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "input_layernorm.bias", (h,)),
                (p + "self_attn.query_key_value.weight", (3 * h, h)), (p + "self_attn.query_key_value.bias", (3 * h,)),
                (p + "self_attn.q_layernorm.weight", (d,)), (p + "self_attn.q_layernorm.bias", (d,)),
                (p + "self_attn.k_layernorm.weight", (d,)), (p + "self_attn.k_layernorm.bias", (d,)),
                (p + "self_attn.dense.weight", (h, h)), (p + "self_attn.dense.bias", (h,)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "post_attention_layernorm.bias", (h,)),
                (p + "mlp.dense_h_to_4h.weight", (i, h)), (p + "mlp.dense_h_to_4h.bias", (i,)),
                (p + "mlp.dense_4h_to_h.weight", (h, i)), (p + "mlp.dense_4h_to_h.bias", (h,))]
    out += [("model.final_layernorm.weight", (h,)), ("model.final_layernorm.bias", (h,)),
            ("lm_head.weight", (V, h))]
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], gen: torch.Generator) -> None:
    """One safetensors file, written as its header then each tensor's bytes, block by block."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        nbytes = _numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in tensors:
            if len(shape) == 1:  # norms ~1, biases ~0: a model whose activations stay finite
                base = 1.0 if name.endswith("layernorm.weight") else 0.0
                t = base + 0.02 * torch.randn(shape, generator=gen)
                f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
                continue
            rows, cols = shape
            step = max(1, BLOCK_ELEMENTS // cols)
            std = cols ** -0.5
            for a in range(0, rows, step):
                t = torch.randn(min(step, rows - a), cols, generator=gen) * std
                f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_synthetic(out: Path, cfg: dict, shard_bytes: int = SHARD_BYTES, seed: int = 0) -> Path:
    """A transformers directory of random bf16 weights in `cfg`'s shapes, shards + index."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = checkpoint_tensors(cfg)
    shards, current, size = [], [], 0
    for name, shape in tensors:
        n = _numel(shape) * 2
        if current and size + n > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(out / fname, shard, gen)
        weight_map.update({name: fname for name, _ in shard})
    total = sum(_numel(s) * 2 for _, s in tensors)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out)
    return out


def write_tokenizer(out: Path) -> None:
    """A small sentencepiece tokenizer (byte fallback), enough for `kaki generate` to run."""
    import io
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    words = "the of and to in is was for on with as by at from that this which it an be or are".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=300,
                                   model_type="unigram", byte_fallback=True, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, num_threads=1, minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))


def peak_rss(cmd: list[str]) -> dict:
    """Run `cmd` in a fresh process and return its peak RSS (bytes) and wall time."""
    t0 = time.perf_counter()
    if shutil.which("time") and Path("/usr/bin/time").exists():
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        peak = int(m.group(1)) * 1024 if m else None
        tool = "/usr/bin/time -v"
    else:
        wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
                   "print('PEAK_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                   "sys.exit(r.returncode)")
        proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
        m = re.search(r"PEAK_KB (\d+)", proc.stderr)
        peak = int(m.group(1)) * 1024 if m else None
        tool = "getrusage(RUSAGE_CHILDREN)"
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or peak is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"peak_rss": peak, "wall_s": wall, "stdout": proc.stdout, "tool": tool}


LOAD_AND_GENERATE = """
import json, sys, time
t0 = time.perf_counter()
import kaki
from kaki.engine import Scheduler
from kaki.sampling import SamplingParams
llm = kaki.load(sys.argv[1], dtype="bfloat16", device="cpu", quantize=sys.argv[2] if sys.argv[2] != "none" else None)
t1 = time.perf_counter()
# Token ids straight into the engine: a random model's output ids need not exist in the small
# synthetic tokenizer. Prefill and decode touch every weight.
ids = [1] + [100 + 7 * i for i in range(15)]
sched = Scheduler(llm.model, [], max_rows=1)
seq = sched.sequence(sched.add_request(ids, SamplingParams(max_new_tokens=int(sys.argv[3]))))
while sched.has_work:
    sched.step()
toks = seq.tokens
t2 = time.perf_counter()
status = open("/proc/self/status").read()
kb = lambda k: int(status.split(k + ":")[1].split()[0]) * 1024
print(json.dumps(dict(load_s=t1 - t0, generate_s=t2 - t1, tokens=toks, hwm=kb("VmHWM"), rss=kb("VmRSS"),
                      rss_file=kb("RssFile"), rss_anon=kb("RssAnon"))))
"""


def load_cmd(model_dir: Path, quantize: str | None, tokens: int = 2) -> list[str]:
    """A fresh interpreter that runs kaki.load(DIR, quantize=...) and generates `tokens` tokens
    (as `kaki generate --quantize` does, minus detokenizing)."""
    return [sys.executable, "-c", LOAD_AND_GENERATE, str(model_dir), quantize or "none", str(tokens)]


def baseline_cmd() -> list[str]:
    """The same interpreter importing what the load imports, loading nothing."""
    return [sys.executable, "-c", "import torch, kaki, kaki.engine, kaki.quant.load, tokenizers, sentencepiece"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/persimmon-8b-synthetic", help="where to write the checkpoint")
    ap.add_argument("--quantize", default="int8")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    out = Path(args.dir)
    from kaki.config import ModelConfig
    from kaki.quant import as_spec, weight_bytes

    cfg = ModelConfig.from_dict(PERSIMMON_8B)
    bf16_bytes = cfg.num_parameters() * 2
    q_bytes = weight_bytes(cfg, as_spec(args.quantize))
    if not (out / "config.json").is_file():
        free = shutil.disk_usage(out.parent if out.parent.exists() else "/").free
        if free < bf16_bytes * 1.05:
            sys.exit(f"need ~{bf16_bytes / 1e9:.1f} GB free at {out.parent}, have {free / 1e9:.1f} GB; "
                     "pass --dir somewhere with room")
        print(f"writing {bf16_bytes / 1e9:.1f} GB of random bf16 weights to {out} "
              f"({free / 1e9:.0f} GB free) ...", flush=True)
        t0 = time.perf_counter()
        write_synthetic(out, PERSIMMON_8B)
        print(f"  written in {time.perf_counter() - t0:.0f} s", flush=True)
    base = peak_rss(baseline_cmd())
    print(f"baseline (imports only): peak RSS {base['peak_rss'] / 1e9:.2f} GB")
    run = peak_rss(load_cmd(out, args.quantize))
    peak = run["peak_rss"]
    inner = json.loads(run["stdout"].strip().splitlines()[-1])
    print(f"kaki.load(quantize={args.quantize!r}) + 2 tokens: peak RSS {peak / 1e9:.2f} GB ({peak / 2**30:.2f} GiB) "
          f"measured with {run['tool']}; load {inner['load_s']:.0f} s, 2 tokens {inner['generate_s']:.1f} s; "
          f"after generating: RSS {inner['rss'] / 1e9:.2f} GB of which file-backed {inner['rss_file'] / 1e9:.2f} GB; "
          f"{args.quantize} weights {q_bytes / 1e9:.2f} GB, bf16 checkpoint {bf16_bytes / 1e9:.2f} GB; "
          f"target < 12 GB: {'met' if peak < 12e9 else 'NOT met'}")
    results = dict(quantize=args.quantize, peak_rss=peak, baseline_rss=base["peak_rss"], wall_s=run["wall_s"],
                   quantized_weight_bytes=q_bytes, bf16_checkpoint_bytes=bf16_bytes, tool=run["tool"],
                   child=inner)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
