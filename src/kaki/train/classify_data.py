"""Labelled JSONL for classifier training: records -> token ids and label targets.

Sequence classification, one record per line: `{"text": ..., "label": L}` where L is
- a label name (`"positive"`) or an id (`2`): single-label classification;
- a number with a fraction (`0.73`): regression (one output);
- a list of names or ids (`["toxic", "insult"]`, maybe empty): multi-label classification.
Token classification: `{"tokens": ["Ada", "lived", "in", "London"], "labels": ["B-PER", "O", "O",
"B-LOC"]}`, one label (name or id) per word. The words are joined with single spaces and tokenized
once; each word's first subword token carries its label, continuation pieces, BOS and padding -100
(transformers' convention, so only one prediction per word counts).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import torch

from kaki.errors import KakiError
from kaki.heads import SEQUENCE, TOKEN
from kaki.train.data import BadLines, read_records, split_eval


@dataclass
class Example:
    ids: list[int]
    target: object  # class id, float, multi-hot list, or per-token ids (-100: not trained)


@dataclass
class LabelSpace:
    names: list[str]
    problem_type: str  # transformers' problem_type


def _is_label(v) -> bool:
    return isinstance(v, (str, int, float)) and not isinstance(v, bool)


def check_sequence_record(rec) -> str | None:
    if not isinstance(rec, dict) or "text" not in rec or "label" not in rec:
        return "needs `text` and `label`"
    if not isinstance(rec["text"], str) or not rec["text"].strip():
        return "`text` is not a non-empty string"
    label = rec["label"]
    if isinstance(label, list):
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in label):
            return "a multi-label `label` list must hold label names or ids"
    elif not _is_label(label):
        return "`label` must be a name, an id, a number or a list of names"
    return None


def check_token_record(rec) -> str | None:
    if not isinstance(rec, dict) or "tokens" not in rec or "labels" not in rec:
        return "needs `tokens` (words) and `labels` (one per word)"
    words, labels = rec["tokens"], rec["labels"]
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
        return "`tokens` must be a non-empty list of non-empty words"
    if not isinstance(labels, list) or len(labels) != len(words):
        return f"`labels` must be a list with one label per word ({len(words)})"
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in labels):
        return "each of `labels` must be a label name or id"
    return None


def read_labelled(paths: list[Path], task: str, strict: bool, bad: BadLines) -> list[list[dict]]:
    check = check_sequence_record if task == SEQUENCE else check_token_record
    out = []
    for path in paths:
        records = [rec for _, rec in read_records(path, bad, strict, check=check)]
        if not records:
            raise KakiError(f"{path} holds no usable {task} records ({bad.describe(path)}); "
                            + ('each line needs {"text": ..., "label": ...}' if task == SEQUENCE else
                               'each line needs {"tokens": [words], "labels": [one per word]}'))
        out.append(records)
    return out


def infer_labels(records: list[dict], task: str, given: list[str] | None,
                 base: LabelSpace | None) -> LabelSpace:
    """The label names and problem_type: --labels, else the base classifier's, else the data's."""
    values = [v for r in records for v in (r["labels"] if task == TOKEN else [r["label"]])]
    if task == TOKEN:
        kind = "single_label_classification"
    elif any(isinstance(v, list) for v in values):
        if not all(isinstance(v, list) for v in values):
            raise KakiError("some records have a list `label` (multi-label) and some do not; use lists "
                            "throughout (an empty list for none)")
        kind = "multi_label_classification"
    elif any(isinstance(v, float) for v in values):
        if any(isinstance(v, str) for v in values):
            raise KakiError("the data mixes label names and numbers; regression needs numbers only")
        kind = "regression"
    else:
        kind = "single_label_classification"
    if base is not None and base.problem_type and base.problem_type != kind:
        raise KakiError(f"--model is a {base.problem_type} classifier but the data's labels make it "
                        f"{kind}; start from the causal LM instead, or fix the labels")
    names = given or (base.names if base is not None else None)
    if names is None:
        flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
        if kind == "regression":
            names = ["LABEL_0"]
        elif any(isinstance(x, str) for x in flat):
            if any(not isinstance(x, str) for x in flat):
                raise KakiError("the data mixes label names and ids; use one or the other (or pass "
                                "--labels so ids and names agree)")
            names = sorted(set(flat))
        else:
            names = [f"LABEL_{i}" for i in range(max(int(x) for x in flat) + 1)]
    if kind == "regression" and len(names) != 1:
        raise KakiError(f"regression labels (numbers) need one output, but the labels are {names}")
    if kind != "regression" and len(names) < 2:
        raise KakiError(f"classification needs at least two labels, got {names}; pass --labels a,b,...")
    if len(set(names)) != len(names):
        raise KakiError(f"label names repeat: {names}")
    return LabelSpace(list(names), kind)


def label_id(value, names: list[str]) -> int:
    if isinstance(value, str):
        if value not in names:
            raise KakiError(f"label {value!r} is not one of {', '.join(names)}; add it to --labels")
        return names.index(value)
    if not (isinstance(value, int) or float(value).is_integer()) or not 0 <= int(value) < len(names):
        raise KakiError(f"label id {value!r} is out of range for {len(names)} labels ({', '.join(names)})")
    return int(value)


def align_word_labels(tok, words: list[str], word_labels: list[int]) -> tuple[list[int], list[int]]:
    """Token ids of the words joined by spaces, and per token the word's label on the word's first
    token, -100 elsewhere. A token starting in the space before a word belongs to that word."""
    text = " ".join(words)
    ends, pos = [], 0
    for w in words:
        pos += len(w.encode())
        ends.append(pos)
        pos += 1
    ids, starts = tok.encode_with_starts(text)
    targets, seen = [], set()
    for s in starts:
        w = bisect.bisect_right(ends, s)  # the word this byte is in, or the next word after a space
        first = w < len(words) and w not in seen
        targets.append(word_labels[w] if first else -100)
        seen.add(w)
    head = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    return head + ids, [-100] * len(head) + targets


def make_examples(records: list[dict], task: str, space: LabelSpace, tok, max_len: int) -> list[Example]:
    """Texts longer than max_len tokens keep their first max_len (transformers' truncation=True)."""
    out = []
    names = space.names
    for r in records:
        if task == TOKEN:
            ids, target = align_word_labels(tok, r["tokens"], [label_id(v, names) for v in r["labels"]])
            out.append(Example(ids[:max_len], target[:max_len]))
            continue
        label = r["label"]
        if space.problem_type == "regression":
            target = float(label)
        elif space.problem_type == "multi_label_classification":
            hot = {label_id(v, names) for v in label}
            target = [1.0 if i in hot else 0.0 for i in range(len(names))]
        else:
            target = label_id(label, names)
        out.append(Example(tok.encode(r["text"])[:max_len], target))
    return out


def split(files: list[list[dict]], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a seeded `fraction` of each file's records (kaki.train.data.split_eval)."""
    train, held = [], []
    for i, records in enumerate(files):
        out = split_eval(len(records), fraction, seed, i)
        held += [r for j, r in enumerate(records) if j in out]
        train += [r for j, r in enumerate(records) if j not in out]
    return train, held


def collate(examples: list[Example], task: str, problem_type: str, pad_id: int):
    """(input_ids, valid, targets), right-padded with `pad_id` (pooling finds the last token that
    is not the pad id, so it must be config.pad_token_id)."""
    S = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), S), pad_id, dtype=torch.long)
    valid = torch.zeros(len(examples), S, dtype=torch.bool)
    for b, e in enumerate(examples):
        ids[b, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        valid[b, :len(e.ids)] = True
    if task == TOKEN:
        targets = torch.full((len(examples), S), -100, dtype=torch.long)
        for b, e in enumerate(examples):
            targets[b, :len(e.target)] = torch.tensor(e.target, dtype=torch.long)
    elif problem_type == "single_label_classification":
        targets = torch.tensor([e.target for e in examples], dtype=torch.long)
    else:
        targets = torch.tensor([e.target for e in examples], dtype=torch.float)
    return ids, valid, targets
