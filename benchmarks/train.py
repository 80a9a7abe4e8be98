"""Training throughput: kaki's model vs transformers' PersimmonForCausalLM, same weights, same batch,
same optimizer (torch AdamW, foreach), same loss, on this machine's CPU (or CUDA with --device).

    .venv/bin/python benchmarks/train.py            # ~100M-parameter Persimmon, seq 256 x batch 4
    .venv/bin/python benchmarks/train.py --profile  # plus where kaki's step time goes

A step is forward + backward + AdamW step on one batch; the two implementations alternate step by
step (ABAB...) so machine noise falls on both alike. Prints tokens/s for each and the ratio, from
the fastest step of each (on a shared machine the minimum is the least noisy estimate; the median
is printed too).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def persimmon_config(args):
    import transformers as T

    return T.PersimmonConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=2048,
        qk_layernorm=True, partial_rotary_factor=0.5, rope_theta=25000.0, bos_token_id=1, eos_token_id=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per implementation (after 1 warmup)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    ap.add_argument("--profile", action="store_true", help="print kaki's top ops by CPU time")
    args = ap.parse_args()

    import transformers as T

    from kaki.config import read_config
    from kaki.loading import load_model
    from kaki.train.loop import token_loss_sum

    dev = torch.device(args.device)
    torch.manual_seed(0)
    hf = T.PersimmonForCausalLM(persimmon_config(args)).to(dev).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = load_model(Path(tmp), read_config(tmp), torch.float32, dev).train()
    for p in ours.parameters():
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in ours.parameters())

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch_size, args.seq_len + 1), generator=g).to(dev)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    count = targets.numel()
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else torch.autocast(dev.type, enabled=False))

    def kaki_step(opt):
        with autocast:
            loss = token_loss_sum(ours, inputs, targets) / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def hf_step(opt):
        with autocast:
            logits = hf(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum") / count
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def optimizer(model):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)

    runs = {"kaki": (kaki_step, optimizer(ours)), "transformers": (hf_step, optimizer(hf))}
    times: dict[str, list[float]] = {k: [] for k in runs}
    first_loss = {}
    for name, (step, opt) in runs.items():  # warmup: allocations, first-touch of optimizer state
        first_loss[name] = step(opt)
    for _ in range(args.steps):
        for name, (step, opt) in runs.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(opt)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)

    tokens = args.batch_size * args.seq_len
    print(f"Persimmon {n_params / 1e6:.1f}M params ({args.layers} x {args.hidden}, vocab {args.vocab}), "
          f"batch {args.batch_size} x {args.seq_len} = {tokens} tokens/step, {args.precision}, {dev}, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps each")
    print(f"first-step loss: kaki {first_loss['kaki']:.6f}, transformers {first_loss['transformers']:.6f}")
    rate = {}
    for name, ts in times.items():
        rate[name] = tokens / min(ts)
        print(f"  {name:13s} {rate[name]:8.1f} tokens/s   (fastest step {min(ts):.3f} s; "
              f"median {statistics.median(ts):.3f}, max {max(ts):.3f})")
    print(f"kaki / transformers = {rate['kaki'] / rate['transformers']:.3f}x")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        step, opt = runs["kaki"]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(opt)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
