"""Evaluation: perplexity on text/chat records and answer accuracy on question/answer records.

Records (JSONL, one object per line; a file may mix them):
- `{"text": ...}`: every token after the first is scored.
- `{"messages": [...]}`: rendered with the model's chat format; only the assistant replies'
  tokens are scored (the same tokens `kaki train` trains on).
- `{"question", "answer", "key_phrase"?, "passages"? | "passage_id"?}`: the question is asked in
  the chat format, greedily, with or without its gold passages in the prompt (the context block of
  kaki.chat_format). `passage_id` refers to a passages JSONL (`id`, `title`, `text`).
- `{"question", "passage_ids", "key_terms"}`: a user question, scored for usefulness
  (kaki.usefulness) without and with retrieval.

Perplexity = exp(total negative log-likelihood of the scored tokens / their number), over the
whole file (not a mean of per-record perplexities). Texts longer than the model's context are cut
into consecutive windows; a window's first token is context only.

Accuracy: `exact` = the reply equals the gold answer after normalization (case, punctuation,
articles and whitespace, as in SQuAD); `contains` = the key phrase (else the gold answer) occurs in
the reply, case-insensitively.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kaki.chat_format import fit_passages, format_for_llm, with_context
from kaki.errors import KakiError
from kaki.files import jsonl_lines


# ----------------------------------------------------------------------------- reading

def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise KakiError(f"{p} does not exist; --data takes a JSONL file")
    out = []
    for n, rec, problem in jsonl_lines(p):
        if problem is not None:
            raise KakiError(f"{p}:{n}: {problem}")
        if not isinstance(rec, dict) or not ({"text", "messages", "question"} & rec.keys()):
            raise KakiError(f"{p}:{n} has none of `text`, `messages` or `question`")
        if "question" in rec and "key_terms" in rec:  # a user question (kaki.usefulness)
            check_user_question(rec, f"{p}:{n}")
        elif "question" in rec and not isinstance(rec.get("answer"), str):
            raise KakiError(f"{p}:{n} has a `question` but no string `answer` (or `key_terms`, for a "
                            "user question)")
        out.append(rec)
    if not out:
        raise KakiError(f"{p} has no records")
    return out


def check_user_question(rec: dict, where: str) -> None:
    groups, ids = rec.get("key_terms"), rec.get("passage_ids", [])
    if not (isinstance(rec.get("question"), str) and rec["question"].strip()):
        raise KakiError(f"{where}: a user question needs a non-empty `question`")
    if not (isinstance(groups, list) and groups and all(
            isinstance(g, list) and g and all(isinstance(t, str) and t for t in g) for g in groups)):
        raise KakiError(f"{where}: `key_terms` must be a non-empty list of non-empty lists of terms, "
                        "e.g. [[\"join\"], [\"str\", \"string\"]]")
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise KakiError(f"{where}: `passage_ids` must be a list of passage ids")



def attach_passages(questions: list[dict], passages_path: str | Path | None) -> list[dict]:
    """Questions with `passages` filled in from their `passage_id` (a list of ids works too)."""
    needed = [q for q in questions if "passages" not in q and q.get("passage_id") is not None]
    if not needed:
        return questions
    if passages_path is None or not Path(passages_path).is_file():
        raise KakiError(f"questions refer to passage ids but the passages file {passages_path} does not "
                        "exist; pass --passages FILE (JSONL with id, title, text)")
    by_id = {r["id"]: r for r in read_jsonl_any(passages_path)}
    out = []
    for q in questions:
        if q in needed:
            ids = q["passage_id"] if isinstance(q["passage_id"], list) else [q["passage_id"]]
            missing = [i for i in ids if i not in by_id]
            if missing:
                raise KakiError(f"passage id {missing[0]!r} is not in {passages_path}")
            found = [by_id[i] for i in ids]
            q = {**q, "passages": [{"title": p.get("title", p["id"]), "text": p["text"]} for p in found]}
        out.append(q)
    return out


def read_jsonl_any(path) -> list[dict]:
    """Every record of a JSONL file, whatever its fields (a passages file)."""
    out = []
    for n, rec, problem in jsonl_lines(path):
        if problem is not None:
            raise KakiError(f"{path}:{n}: {problem}")
        out.append(rec)
    return out


# ----------------------------------------------------------------------------- perplexity

@dataclass
class Perplexity:
    nll: float  # summed negative log-likelihood (nats)
    tokens: int  # scored tokens
    records: int

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")


def scored_sequence(llm, rec: dict, fmt) -> tuple[list[int], list[bool]]:
    """Token ids of a record (BOS as the tokenizer adds it) and which ones are scored."""
    tok = llm.tokenizer
    add_bos = fmt.add_bos if fmt.add_bos is not None else tok.add_bos
    bos = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    if "messages" in rec:
        text, spans = fmt.render_with_spans(rec["messages"])
        ids, starts = tok.encode_with_starts(text)
        byte_at = [0]
        for c in text:
            byte_at.append(byte_at[-1] + len(c.encode()))
        bspans = [(byte_at[a], byte_at[b]) for a, b in spans]
        scored = [any(a <= s < b for a, b in bspans) for s in starts]
    else:
        ids = tok.encode(rec["text"], add_bos=False)
        scored = [True] * len(ids)
    ids = bos + ids
    scored = [False] * len(bos) + scored
    # The first token has no prediction.
    if scored:
        scored[0] = False
    return ids, scored


def windows(ids: list[int], scored: list[bool], length: int) -> list[tuple[list[int], list[bool]]]:
    """Consecutive windows of at most `length` tokens; window k>0 starts with the last token of
    window k-1 as context only, so every scored token is predicted exactly once."""
    out = []
    start = 0
    while True:
        chunk, mask = ids[start:start + length], scored[start:start + length]
        if start:
            mask = [False] + mask[1:]
        out.append((chunk, mask))
        if start + length >= len(ids):
            return out
        start += length - 1


@torch.inference_mode()
def perplexity(llm, records: list[dict], fmt=None, batch_size: int = 8, max_len: int | None = None,
               progress=None) -> Perplexity:
    """exp of the mean token loss over every scored token of the text/chat records."""
    fmt = fmt or format_for_llm(llm)
    L = min(max_len or llm.context_length, llm.context_length)
    if L < 2:
        raise KakiError(f"--max-len must be at least 2, got {L}")
    items = []
    n_rec = 0
    for rec in records:
        if "question" in rec:
            continue
        n_rec += 1
        ids, scored = scored_sequence(llm, rec, fmt)
        items += [w for w in windows(ids, scored, L) if any(w[1])]
    items.sort(key=lambda w: len(w[0]))  # similar lengths batch with little padding
    model = llm.model
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        T = max(len(ids) for ids, _ in batch)
        pad = llm.tokenizer.pad_id if llm.tokenizer.pad_id is not None else 0
        # Right padding: with causal attention a real token never sees the pads after it.
        x = torch.full((len(batch), T), pad, dtype=torch.long)
        m = torch.zeros(len(batch), T, dtype=torch.bool)
        for i, (ids, mask) in enumerate(batch):
            x[i, :len(ids)] = torch.tensor(ids)
            m[i, :len(mask)] = torch.tensor(mask)
        x, m = x.to(device), m.to(device)
        logits = model(x).float()  # (B, T, V); log-softmax in fp32 whatever the weights' dtype
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = x[:, 1:]
        tok_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
        sel = m[:, 1:]
        nll += float(tok_nll[sel].double().sum())
        count += int(sel.sum())
        if progress:
            progress(len(batch))
    return Perplexity(nll, count, n_rec)


# ----------------------------------------------------------------------------- answer accuracy

def normalize_answer(s: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(reply: str, answer: str) -> bool:
    return normalize_answer(reply) == normalize_answer(answer)


def contains_match(reply: str, key_phrase: str) -> bool:
    return bool(key_phrase.strip()) and key_phrase.strip().lower() in reply.lower()


@dataclass
class QAResult:
    context: bool
    items: list[dict] = field(default_factory=list)

    @property
    def exact(self) -> float:
        return sum(i["exact"] for i in self.items) / len(self.items) if self.items else float("nan")

    @property
    def contains(self) -> float:
        return sum(i["contains"] for i in self.items) / len(self.items) if self.items else float("nan")


def qa_prompt(llm, fmt, q: dict, context: bool, max_new_tokens: int) -> str:
    passages = (q.get("passages") or []) if context else []
    if passages:
        tok = llm.tokenizer
        count = lambda s: len(tok.encode(s, add_bos=False))  # noqa: E731
        bare = count(fmt.render([{"role": "user", "content": q["question"]}]))
        # What is left for passages once the question, the reply and a BOS (and slack) fit.
        passages = fit_passages(passages, llm.context_length - max_new_tokens - bare - 8, count)
    return fmt.render([{"role": "user", "content": with_context(q["question"], passages)}],
                      add_generation_prompt=True)


def answer_accuracy(llm, questions: list[dict], context: bool, fmt=None, max_new_tokens: int = 64,
                    batch_size: int = 16, progress=None) -> QAResult:
    """Greedy replies to each question (with its passages in the prompt when `context`)."""
    fmt = fmt or format_for_llm(llm)
    result = QAResult(context)
    prompts = [qa_prompt(llm, fmt, q, context, max_new_tokens) for q in questions]
    for b in range(0, len(prompts), batch_size):
        # Pure greedy: the model's generation_config sampling defaults (penalties too) are overridden.
        outs = llm.generate(prompts[b:b + batch_size], add_bos=fmt.add_bos, temperature=0.0,
                            repetition_penalty=1.0, max_new_tokens=max_new_tokens, stop=list(fmt.stop))
        for q, c in zip(questions[b:b + batch_size], outs):
            reply = c.text.strip()
            key = q.get("key_phrase") or q["answer"]
            result.items.append({"question": q["question"], "answer": q["answer"], "key_phrase": key,
                                 "reply": reply, "exact": exact_match(reply, q["answer"]),
                                 "contains": contains_match(reply, key)})
        if progress:
            progress(len(outs))
    return result
