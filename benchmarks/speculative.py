"""Speculative decoding benchmarks, each tool against its own plain decoding, one run.

--mode grounded (default): prompt lookup on the bundled model (kaki-tiny), batch 1, greedy: tokens/s
with and without it. Two prompt sets from data/eval/questions.jsonl, in the model's chat format:
- grounded: the question with its gold passage in the prompt (the reply copies from it);
- ungrounded: the question alone (nothing in the prompt to copy).
No stop strings (eos ends a reply), so both tools decode the same tokens. For each prompt the
plain and speculative runs alternate (`--repeats` rounds); the report gives tokens/s for each,
their ratio, the drafts' acceptance rate, the tokens per decode step (one sequence in one target
pass) and whether the token ids were identical. `--transformers` adds transformers' own
`generate(..., prompt_lookup_num_tokens=K)` against its plain `generate` on the same model.

--mode verify: the cost of verification on a memory-bound model, the ~1B random Persimmon of
benchmarks/decode.py: the time of one forward pass over 1 + K tokens (K = 1..8) after a
`--context`-token prompt, against one over 1 token (median of `--repeats` interleaved rounds).
With a per-draft acceptance rate a (`--acceptance`, e.g. grounded mode's), K drafts give
(1 - a^(K+1)) / (1 - a) tokens per pass, so the expected speedup at 1B is that over the cost ratio.

--mode draft: the draft-model machinery, a ~1B target with a ~100M draft, both random (their
acceptance would mean nothing): the acceptance is forced instead (each draft kept with
probability `--acceptance` until the first rejection; the verdict's picks replaced, everything else
as in a real run: the draft's K passes, the target's verify pass, both caches' rollbacks), and the
report gives the time per emitted token against plain decoding of the same target.

    .venv/bin/python benchmarks/speculative.py [--questions 12] [--max-new 64] [--k 4]
                                               [--dtype float32] [--repeats 2] [--transformers]
    .venv/bin/python benchmarks/speculative.py --mode verify [--acceptance 0.6] [--context 256]
    .venv/bin/python benchmarks/speculative.py --mode draft [--acceptance 0.6] [--k 4] [--max-new 64]
    (--quick: the small models, to check the script works)

Wall-clock numbers: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import kaki
from kaki.chat_format import format_for_llm
from kaki.evaluate import attach_passages, qa_prompt, read_jsonl
from kaki.paths import REPO_ROOT, bundled_model

EVAL = REPO_ROOT / "data" / "eval"


def prompts(llm, n: int, max_new: int) -> dict[str, list[str]]:
    fmt = format_for_llm(llm)
    qs = attach_passages(read_jsonl(EVAL / "questions.jsonl"), EVAL / "passages.jsonl")[:n]
    return {"grounded": [qa_prompt(llm, fmt, q, True, max_new) for q in qs],
            "ungrounded": [qa_prompt(llm, fmt, q, False, max_new) for q in qs]}


def kaki_run(llm, prompt: str, max_new: int, speculative: str) -> tuple[list[int], float, dict]:
    t = time.perf_counter()
    c = llm.generate(prompt, max_new_tokens=max_new, temperature=0.0, repetition_penalty=1.0,
                     speculate=speculative)[0]
    return c.token_ids, time.perf_counter() - t, llm.last_stats


def hf_run(model, ids: torch.Tensor, max_new: int, k: int | None) -> tuple[list[int], float]:
    extra = {"prompt_lookup_num_tokens": k} if k else {}
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=2, pad_token_id=0, **extra)
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("grounded", "verify", "draft"), default="grounded")
    ap.add_argument("--acceptance", type=float, default=0.6,
                    help="verify/draft modes: the per-draft acceptance rate to combine or force")
    ap.add_argument("--context", type=int, default=256, help="verify/draft modes: prompt tokens before decoding")
    ap.add_argument("--quick", action="store_true", help="verify/draft modes: small models, to check the script")
    ap.add_argument("--cache-dir", default=os.environ.get("KAKI_BENCH_DIR", "/tmp/kaki-bench"))
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="drafted tokens per step at most")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--transformers", action="store_true")
    args = ap.parse_args()
    if args.mode == "verify":
        return verify_cost(args)
    if args.mode == "draft":
        return draft_machinery(args)
    path = bundled_model()
    if path is None:
        print("no bundled model (models/kaki-tiny)", file=sys.stderr)
        return 1
    llm = kaki.load(path, dtype=args.dtype, device="cpu")
    llm.prefix_cache_bytes = 0  # every run prefills its whole prompt
    spec = f"ngram:{args.k}"
    sets = prompts(llm, args.questions, args.max_new)
    print(f"kaki-tiny {args.dtype}, {torch.get_num_threads()} threads, {args.questions} questions, "
          f"max {args.max_new} new tokens, K={args.k}, {args.repeats} rounds")
    kaki_run(llm, sets["grounded"][0], 8, "off")  # warm-up (small-M plan, allocator)
    kaki_run(llm, sets["grounded"][0], 8, spec)
    hf = None
    if args.transformers:
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    for name, texts in sets.items():
        t_plain = t_spec = 0.0
        n_plain = n_spec = 0
        drafted = kept = steps = decoded = same = 0
        for _ in range(args.repeats):
            for prompt in texts:
                a, ta, _ = kaki_run(llm, prompt, args.max_new, "off")
                b, tb, st = kaki_run(llm, prompt, args.max_new, spec)
                t_plain, t_spec, n_plain, n_spec = t_plain + ta, t_spec + tb, n_plain + len(a), n_spec + len(b)
                drafted, kept = drafted + st["spec_draft_tokens"], kept + st["spec_accepted_tokens"]
                steps, decoded = steps + st["decode_steps"], decoded + st["decode_tokens"]
                same += a == b
        runs = args.repeats * len(texts)
        plain_tps, spec_tps = n_plain / t_plain, n_spec / t_spec
        print(f"{name:>10}: kaki plain {plain_tps:7.1f} tok/s, ngram {spec_tps:7.1f} tok/s, "
              f"x{spec_tps / plain_tps:.2f}; accepted {kept}/{drafted} drafted "
              f"({kept / max(drafted, 1):.0%}), {decoded / max(steps, 1):.2f} tokens per step "
              f"({steps / max(decoded, 1):.2f} target passes per token); identical ids {same}/{runs}")
        if hf is None:
            continue
        t_plain = t_spec = 0.0
        n_plain = n_spec = same = 0
        for _ in range(args.repeats):
            for prompt in texts:
                ids = torch.tensor([llm.tokenizer.encode(prompt)])
                a, ta = hf_run(hf, ids, args.max_new, None)
                b, tb = hf_run(hf, ids, args.max_new, args.k)
                t_plain, t_spec, n_plain, n_spec = t_plain + ta, t_spec + tb, n_plain + len(a), n_spec + len(b)
                same += a == b
        plain_tps, spec_tps = n_plain / t_plain, n_spec / t_spec
        print(f"{'':>10}  transformers plain {plain_tps:7.1f} tok/s, prompt lookup {spec_tps:7.1f} tok/s, "
              f"x{spec_tps / plain_tps:.2f}; identical ids {same}/{runs}")
    return 0


# ----------------------------------------------------------------------------- verify and draft modes

def bench_models(args, draft: bool):
    """The ~1B target of benchmarks/decode.py (and a ~100M draft of its vocabulary), loaded by kaki."""
    from decode import CONFIG, QUICK, make_checkpoint
    from kaki.config import read_config
    from kaki.loading import load_model

    root = Path(args.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if args.quick else CONFIG
    small = dict(cfg, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4) \
        if args.quick else dict(cfg, hidden_size=768, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=12)
    dtype = getattr(torch, args.dtype)
    out = []
    for c in (cfg, small) if draft else (cfg,):
        path = make_checkpoint(root, args.dtype, c)
        rc = read_config(path)
        out.append(load_model(path, rc, dtype, torch.device("cpu")))
        print(f"{'draft' if len(out) == 2 else 'target'}: {rc.num_parameters() / 1e6:.0f}M parameters ({path.name})")
    return out


def verify_cost(args) -> int:
    from kaki.engine import RowCache

    (model,) = bench_models(args, draft=False)
    torch.manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.context))
    cache = RowCache(model.config, 1, args.context + 16, model.dtype, model.device)
    times: dict[int, list[float]] = {k: [] for k in range(9)}
    with torch.inference_mode():
        cache.use(0, 1)
        model(prompt, None, cache, last_only=True)
        for rnd in range(args.repeats * 5 + 1):  # interleaved rounds; the first warms every shape up
            for k in range(9):
                ids = torch.randint(3, model.config.vocab_size, (1, 1 + k))
                t = time.perf_counter()
                model(ids, None, cache)  # every position's logits, as a verify pass
                dt = time.perf_counter() - t
                cache.trim(0, 1 + k)
                if rnd:
                    times[k].append(dt)
    base = statistics.median(times[0])
    a = args.acceptance
    print(f"{torch.get_num_threads()} threads, {args.dtype}, context {args.context}, median of {len(times[0])} "
          f"rounds; one token: {base * 1e3:.1f} ms; acceptance a = {a:.2f} per draft")
    print(" K  1+K tokens ms  cost x1  tokens/pass at a  expected speedup")
    for k in range(1, 9):
        t = statistics.median(times[k])
        per_pass = (1 - a ** (k + 1)) / (1 - a) if a < 1 else k + 1
        print(f"{k:2d}  {t * 1e3:13.1f}  {t / base:7.2f}  {per_pass:16.2f}  {per_pass / (t / base):16.2f}")
    return 0


def draft_machinery(args) -> int:
    import kaki.engine.scheduler as scheduler
    from kaki.engine.draft import DraftModel
    from kaki.engine.sampler import Pick
    from kaki.engine.speculative import Verdict
    from kaki.sampling import SamplingParams

    target, small = bench_models(args, draft=True)
    rng = random.Random(0)

    def forced(logits, row, draft, q=None):
        """Each draft kept with probability --acceptance until the first rejection; then the
        target's own argmax, as a real verdict ends."""
        kept = 0
        while kept < len(draft) and rng.random() < args.acceptance:
            kept += 1
        return Verdict([Pick(t) for t in draft[:kept]] + [Pick(int(logits[kept].argmax()))], kept)

    torch.manual_seed(0)
    prompt = torch.randint(3, target.config.vocab_size, (args.context,)).tolist()
    sp = SamplingParams(max_new_tokens=args.max_new, temperature=0.0, ignore_eos=True)

    def one(spec: bool) -> tuple[float, dict]:
        draft = DraftModel(small, target.config.vocab_size, args.k) if spec else None
        sched = scheduler.Scheduler(target, [], max_rows=1, speculative=f"draft:{args.k}" if spec else None,
                                    draft=draft)
        seq = sched.sequence(sched.add_request(prompt, sp))
        sched.step()  # the prefill and the first token (both runs alike)
        t = time.perf_counter()
        while sched.has_work:
            sched.step()
        dt = time.perf_counter() - t
        stats = sched.stats()
        stats["draft_passes"] = sched.draft.passes if spec else 0
        return dt / (len(seq.tokens) - 1), stats

    real = scheduler.verify
    scheduler.verify = forced
    try:
        plain, spec, stats = [], [], {}
        for rnd in range(args.repeats + 1):  # interleaved; the first round warms up
            p, _ = one(False)
            s, stats = one(True)
            if rnd:
                plain.append(p)
                spec.append(s)
    finally:
        scheduler.verify = real
    p, s = statistics.median(plain), statistics.median(spec)
    drafted, kept = stats["spec_draft_tokens"], stats["spec_accepted_tokens"]
    print(f"{torch.get_num_threads()} threads, {args.dtype}, context {args.context}, {args.max_new} new tokens, "
          f"K={args.k} (adaptive), forced acceptance {args.acceptance:.2f}: kept {kept}/{drafted} "
          f"({kept / max(drafted, 1):.0%}), {stats['decode_tokens'] / max(stats['decode_steps'], 1):.2f} tokens per "
          f"target pass, {stats['draft_passes']} draft passes")
    print(f"time per token: plain {p * 1e3:.1f} ms, draft model {s * 1e3:.1f} ms: x{p / s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
