"""Prompt-lookup speculative decoding: tokens/s with and without it, each tool against its own
plain decoding, on the bundled model (kaki-tiny), batch 1, greedy.

Two prompt sets from data/eval/questions.jsonl, in the model's chat format:
- grounded: the question with its gold passage in the prompt (the reply copies from it);
- ungrounded: the question alone (nothing in the prompt to copy).
No stop strings (eos ends a reply), so both tools decode the same tokens. For each prompt the
plain and speculative runs alternate (`--repeats` rounds); the report gives tokens/s for each,
their ratio, the drafts' acceptance rate, the tokens per decode step (one sequence in one target
pass) and whether the token ids were identical. `--transformers` adds transformers' own
`generate(..., prompt_lookup_num_tokens=K)` against its plain `generate` on the same model.

    .venv/bin/python benchmarks/speculative.py [--questions 12] [--max-new 64] [--k 4]
                                               [--dtype float32] [--repeats 2] [--transformers]

Wall-clock numbers: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
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
                     speculative=speculative)[0]
    return c.token_ids, time.perf_counter() - t, llm.last_stats


def hf_run(model, ids: torch.Tensor, max_new: int, k: int | None) -> tuple[list[int], float]:
    extra = {"prompt_lookup_num_tokens": k} if k else {}
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=2, pad_token_id=0, **extra)
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="drafted tokens per step at most")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--transformers", action="store_true")
    args = ap.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
