"""What quantization costs the bundled demo model (models/kaki-tiny) on its held-out evaluation set
(data/eval/, never trained on): int8 greedy answers equal the unquantized model's on at least 90%
of 50 questions, and perplexity on the held-out passages rises by less than 2% in int8 and 6% in
int4. Both sides run in float32 outside the quantized layers, so only quantization differs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kaki
from kaki.chat_format import format_for_llm
from kaki.evaluate import attach_passages, perplexity, qa_prompt, read_jsonl
from kaki.engine import Scheduler
from kaki.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "kaki-tiny"
EVAL = ROOT / "data" / "eval"
N_QUESTIONS = 50
NEW_TOKENS = 32
N_PASSAGES = 270  # all of them


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 10M-parameter model gains nothing from a second intra-op thread, and on a busy 2-core
    machine OpenMP's hand-offs cost milliseconds per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    return {q: kaki.load(MODEL, dtype="float32", device="cpu", quantize=q) for q in (None, "int8", "int4")}


def greedy_ids(llm, prompt_ids: list[int], eos: list[int]) -> list[int]:
    """One prompt alone (batch 1, how `kaki generate` runs it), token ids only."""
    sp = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    sched = Scheduler(llm.model, eos, max_rows=1)
    seq = sched.sequence(sched.add_request(prompt_ids, sp))
    while sched.has_work:
        sched.step()
    return seq.tokens


def test_int8_greedy_answers_match_the_unquantized_model(models):
    base, q8 = models[None], models["int8"]
    questions = attach_passages(read_jsonl(EVAL / "questions.jsonl"), EVAL / "passages.jsonl")[:N_QUESTIONS]
    assert len(questions) == N_QUESTIONS
    fmt = format_for_llm(base)
    # Half the questions with their passage in the prompt (the retrieval demo), half without.
    prompts = [base.tokenizer.encode(qa_prompt(base, fmt, q, context=i % 2 == 0, max_new_tokens=NEW_TOKENS),
                                     add_bos=fmt.add_bos) for i, q in enumerate(questions)]
    same = [greedy_ids(base, p, base.eos_ids) == greedy_ids(q8, p, base.eos_ids) for p in prompts]
    share = sum(same) / len(same)
    print(f"\nint8 greedy generations equal to the unquantized model's: {sum(same)}/{len(same)} = {share:.0%}")
    assert share >= 0.9, f"only {sum(same)}/{len(same)} int8 answers equal the unquantized ones"


def test_perplexity_rises_little(models):
    passages = [r for r in read_jsonl(EVAL / "passages.jsonl") if "text" in r][:N_PASSAGES]
    ppl = {q: perplexity(llm, passages, batch_size=8) for q, llm in models.items()}
    assert len({p.tokens for p in ppl.values()}) == 1  # the same tokens scored by each
    base = ppl[None].perplexity
    rise = {q: ppl[q].perplexity / base - 1 for q in ("int8", "int4")}
    print(f"\nperplexity on {ppl[None].tokens} held-out tokens: float32 {base:.3f}, "
          + ", ".join(f"{q} {ppl[q].perplexity:.3f} ({rise[q]:+.2%})" for q in rise))
    assert rise["int8"] < 0.02
    assert rise["int4"] < 0.06
