"""Training data: JSONL records -> token ids with a loss mask -> packed fixed-length samples.

Records (one JSON object per line):
- `{"text": "..."}`: plain text, every token trained. OpenChatKit/OIG `<human>: …\n<bot>: …` text is
  accepted as it is; `mask_prompt` trains only the replies (after `<bot>:` or `adept:`).
- `{"messages": [{"role": "user"|"assistant"|"system", "content": "..."}, ...]}`: rendered by the
  model's chat format (kaki.chat_format; Persimmon's `human: …\n\nadept: …` by default for
  Persimmon); by default only the assistant replies, and the EOS after the last one, are trained.
  A token counts as part of a reply when it starts inside the reply's span, so a piece like
  ".\n\n" that begins in a reply and runs into the next turn's separator is trained.

Packing: each document becomes [BOS] + tokens + [EOS] (BOS when the tokenizer adds one); a file's
documents are shuffled per epoch and concatenated into one stream, cut into windows of seq_len + 1
tokens with stride seq_len (inputs = window[:-1], targets = window[1:], so no target is lost
between windows). The tail shorter than a window at the end of an epoch is dropped.

Attention across documents: packed samples are plain causal sequences; a token may attend to the
previous document in its window, across the EOS that separates them (what GPT-2, nanoGPT and
Megatron's default do). The EOS tells the model a new document starts, the cost is a little
wasted attention, and it keeps the fast SDPA causal kernel. Positions run on across the boundary.

Mixing: sample i of the run comes from file f with probability weight_f / sum(weights), drawn
from a generator seeded by (seed, i); each file keeps its own (epoch, window) cursor. The data
position is those integers, so a resumed run draws exactly the samples it would have drawn.
"""

from __future__ import annotations

import random
import re
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Callable

import torch

from kaki.chat_format import check_text, normalize_messages
from kaki.errors import KakiError
from kaki.files import jsonl_lines

# ----------------------------------------------------------------------------- chat rendering
# `messages` records are rendered by kaki.chat_format (the one module chat, serve and training
# share), so a model is trained on exactly the text it is prompted with: Persimmon's
# "human: {user}\n\nadept: {assistant}" for Persimmon models without a chat_template.

_REPLY = re.compile(r"(?:^|\n)(?:<bot>|adept):")
_PROMPT = re.compile(r"\n(?:<human>|human):")


def reply_spans(text: str) -> list[tuple[int, int]]:
    """Spans of the replies in OIG (`<human>:`/`<bot>:`) or Persimmon (`human:`/`adept:`) text."""
    spans = []
    for m in _REPLY.finditer(text):
        start = m.end()
        nxt = _PROMPT.search(text, start)
        spans.append((start, nxt.start() if nxt else len(text)))
    return spans


# ----------------------------------------------------------------------------- reading records

@dataclass
class Document:
    ids: torch.Tensor  # (N,) int32 token ids, BOS/EOS included
    train: torch.Tensor  # (N,) bool: token i is a prediction target


@dataclass
class BadLines:
    """Problems found while reading: every one is logged with file:line; `count` is reported."""
    items: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.items)

    def add(self, path: Path, lineno: int, problem: str, strict: bool) -> None:
        """Record a bad line, or stop at it when `strict` (--strict-data)."""
        msg = f"{path}:{lineno}: {problem}"
        if strict:
            raise KakiError(f"bad data line {msg}; fix it, or drop --strict-data to skip bad lines")
        self.items.append(msg)

    def describe(self, path: Path, shown: int = 3) -> str:
        """Which lines of `path` were bad and why, for the error when none was usable."""
        mine = [m for m in self.items if m.startswith(f"{path}:")]
        if not mine:
            return "it has no records (only blank lines)"
        more = f"; and {len(mine) - shown} more" if len(mine) > shown else ""
        return f"all {len(mine)} of its lines are bad: " + "; ".join(mine[:shown]) + more


def check_record(rec) -> str | None:
    """Why a parsed record cannot be used, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "`messages` is not a non-empty list"
        try:
            msgs = normalize_messages(msgs)
        except KakiError as e:
            return str(e)
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            return "no non-empty assistant message (nothing to train on)"
        return None
    if "text" not in rec:
        return "neither `text` nor `messages`"
    if not isinstance(rec["text"], str):
        return "`text` is not a string"
    if not rec["text"].strip():
        return "empty `text`"
    try:
        check_text(rec["text"], "`text`")
    except KakiError as e:
        return str(e)
    return None


def read_records(path: Path, bad: BadLines, strict: bool,
                 check: Callable[[object], str | None] = check_record) -> list[tuple[int, dict]]:
    """(line number, record) for every usable line; bad lines (`check` says why, or not UTF-8, or
    not JSON) go to `bad` (or raise if strict). Lines are split as bytes and decoded one by one,
    so a bad byte costs only its own line and is reported at its own line number."""
    if not path.is_file():
        raise KakiError(f"data file {path} does not exist")
    out = []
    for lineno, rec, problem in jsonl_lines(path):
        if problem is None:
            try:
                problem = check(rec)
            except RecursionError:
                problem = "invalid JSON (nested too deeply)"
        if problem is not None:
            bad.add(path, lineno, problem, strict)
            continue
        out.append((lineno, rec))
    return out


# ----------------------------------------------------------------------------- tokenizing

def tokenize_record(rec: dict, tok, eos_id: int, mask_prompt: bool, train_on_prompt: bool,
                    chat=None) -> Document:
    """One record as [BOS] + tokens + [EOS] with its loss mask. `chat`: a kaki.chat_format format
    (needed for `messages` records)."""
    add_bos = tok.add_bos
    eos_in_text = False
    if "messages" in rec:
        text, spans = chat.render_with_spans(rec["messages"])
        masked = not train_on_prompt
        last_is_reply = bool(spans) and spans[-1][1] >= len(text.rstrip())
        if getattr(chat, "add_bos", None) is not None:
            add_bos = chat.add_bos
        eos_text = getattr(chat, "eos_token", "")
        # A template that writes the EOS token itself: no second one from packing.
        eos_in_text = bool(eos_text) and text.endswith(eos_text)
    else:
        text = rec["text"]
        masked = mask_prompt
        spans = reply_spans(text) if masked else []
        last_is_reply = bool(spans) and spans[-1][1] == len(text)
    if masked:
        ids, starts = tok.encode_with_starts(text)
        byte_at = list(accumulate((len(c.encode()) for c in text), initial=0))
        bspans = [(byte_at[a], byte_at[b]) for a, b in spans]
        train = [any(a <= s < b for a, b in bspans) for s in starts]
        eos_trained = last_is_reply
    else:
        ids = tok.encode(text, add_bos=False)
        train = [True] * len(ids)
        eos_trained = True
    head = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    tail = [] if eos_in_text else [eos_id]
    all_ids = head + ids + tail
    # BOS after the previous document's EOS is no prediction worth training.
    all_train = [False] * len(head) + train + [eos_trained] * len(tail)
    return Document(torch.tensor(all_ids, dtype=torch.int32), torch.tensor(all_train, dtype=torch.bool))


# ----------------------------------------------------------------------------- sources and packing

@dataclass
class DataSpec:
    path: Path
    weight: float


def parse_data_arg(value: str | list) -> list[DataSpec]:
    """'a.jsonl:0.5,b.jsonl' (weight defaults to 1), or a YAML list of such strings."""
    items = value if isinstance(value, list) else [s for s in str(value).split(",") if s.strip()]
    specs = []
    for item in items:
        item = str(item).strip()
        path, weight = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass
        if weight <= 0:
            raise KakiError(f"data weight must be > 0 in {item!r}")
        specs.append(DataSpec(Path(path), weight))
    if not specs:
        raise KakiError("--data names no files; pass FILE[:weight],...")
    return specs


class PackedFile:
    """One file's training documents, packed per epoch into windows of seq_len + 1 tokens."""

    def __init__(self, name: str, docs: list[Document], seq_len: int, seed: int, index: int):
        self.name, self.docs, self.seq_len = name, docs, seq_len
        self.seed, self.index = seed, index
        self.tokens = int(sum(len(d.ids) for d in docs))
        self.windows = (self.tokens - 1) // seq_len if self.tokens > 0 else 0
        self._epoch: int | None = None
        self._ids = self._train = None
        if self.windows < 1:
            raise KakiError(f"{name} has {self.tokens} training tokens, fewer than one sequence of "
                            f"--seq-len {seq_len} + 1; add data or lower --seq-len")

    def _load_epoch(self, epoch: int) -> None:
        if self._epoch == epoch:
            return
        order = list(range(len(self.docs)))
        random.Random(f"{self.seed}:{self.index}:{epoch}").shuffle(order)
        self._ids = torch.cat([self.docs[i].ids for i in order])
        self._train = torch.cat([self.docs[i].train for i in order])
        self._epoch = epoch

    def window(self, epoch: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._load_epoch(epoch)
        a = k * self.seq_len
        return self._ids[a:a + self.seq_len + 1], self._train[a:a + self.seq_len + 1]


class Mixture:
    """Weighted, resumable stream of packed samples over several files."""

    def __init__(self, files: list[PackedFile], weights: list[float], seed: int):
        self.files, self.seed = files, seed
        total = sum(weights)
        self.cum = list(accumulate(w / total for w in weights))
        self.drawn = 0
        self.cursors = [[0, 0] for _ in files]  # per file: [epoch, next window]

    @property
    def windows_per_epoch(self) -> int:
        return sum(f.windows for f in self.files)

    def draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        u = random.Random(self.seed * 1_000_003 + self.drawn).random()
        fi = min(bisect_right(self.cum, u), len(self.files) - 1)
        self.drawn += 1
        f, cur = self.files[fi], self.cursors[fi]
        ids, train = f.window(cur[0], cur[1])
        cur[1] += 1
        if cur[1] >= f.windows:
            cur[0], cur[1] = cur[0] + 1, 0
        return ids, train

    def state(self) -> dict:
        return {"drawn": self.drawn, "cursors": [list(c) for c in self.cursors],
                "files": [f.name for f in self.files]}

    def load_state(self, state: dict) -> None:
        if state["files"] != [f.name for f in self.files]:
            raise KakiError(f"the checkpoint was trained on {state['files']}, this run's --data is "
                            f"{[f.name for f in self.files]}; resume with the same --data")
        self.drawn = int(state["drawn"])
        self.cursors = [list(map(int, c)) for c in state["cursors"]]


def eval_windows(docs: list[Document], seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Held-out documents packed in order; the last, shorter window is kept (every token counts)."""
    if not docs:
        return []
    ids = torch.cat([d.ids for d in docs])
    train = torch.cat([d.train for d in docs])
    out = []
    for a in range(0, max(len(ids) - 1, 1), seq_len):
        w = ids[a:a + seq_len + 1]
        if len(w) >= 2:
            out.append((w, train[a:a + seq_len + 1]))
    return out


@dataclass
class Dataset:
    train: Mixture
    eval: list[tuple[torch.Tensor, torch.Tensor]]
    bad: BadLines
    train_docs: int
    eval_docs: int


def split_eval(n: int, fraction: float, seed: int, index: int) -> set[int]:
    """Which of n documents are held out: a seeded random `fraction` (at least one when n >= 2)."""
    if fraction <= 0 or n < 2:
        return set()
    k = min(n - 1, max(1, round(n * fraction)))
    return set(random.Random(f"eval:{seed}:{index}").sample(range(n), k))


def check_data_files(value, flag: str = "--data") -> None:
    """Every file `value` (FILE[:weight],...) names exists: checked before a run loads anything."""
    for spec in parse_data_arg(value):
        if not spec.path.is_file():
            what = "is a directory, not a JSONL file" if spec.path.is_dir() else "does not exist"
            raise KakiError(f"{flag} {spec.path} {what}")


@dataclass
class Corpus:
    """The data read and tokenized, before packing: each --data file's training documents and
    weight, and the held-out documents. Packing needs seq_len, which may be chosen from this."""
    files: list[tuple[DataSpec, list[Document], int]]  # (spec, training documents, documents held out)
    eval_docs: list[Document]
    bad: BadLines

    def train_tokens(self) -> list[int]:
        """Training tokens per file (what packing cuts into windows)."""
        return [int(sum(len(d.ids) for d in docs)) for _, docs, _ in self.files]

    def pack(self, seq_len: int, seed: int, log: Callable[[str], None] = print) -> Dataset:
        packed = []
        for i, (spec, docs, held) in enumerate(self.files):
            packed.append(PackedFile(str(spec.path), docs, seq_len, seed, i))
            log(f"{spec.path}: {len(docs)} documents, {packed[-1].tokens:,} tokens, {packed[-1].windows} "
                f"sequences per epoch, weight {spec.weight:g}; {held} held out for eval")
        mixture = Mixture(packed, [spec.weight for spec, _, _ in self.files], seed)
        return Dataset(mixture, eval_windows(self.eval_docs, seq_len), self.bad,
                       sum(len(docs) for _, docs, _ in self.files), len(self.eval_docs))


def read_corpus(data: list[DataSpec], tok, eos_id: int, seed: int, *,
                eval_data: list[DataSpec] | None = None, eval_fraction: float = 0.01,
                mask_prompt: bool = False, train_on_prompt: bool = False, strict: bool = False,
                chat=None, log: Callable[[str], None] = print) -> Corpus:
    bad = BadLines()

    def docs_of(path: Path) -> list[Document]:
        docs = []
        for lineno, rec in read_records(path, bad, strict):
            try:
                docs.append(tokenize_record(rec, tok, eos_id, mask_prompt, train_on_prompt, chat))
            except KakiError as e:  # e.g. the chat_template fails on this record's messages
                bad.add(path, lineno, str(e), strict)
        return docs

    files, eval_docs = [], []
    for i, spec in enumerate(data):
        docs = docs_of(spec.path)
        if not docs:
            raise KakiError(f"{spec.path} holds no usable records: {bad.describe(spec.path)}")
        held = split_eval(len(docs), eval_fraction, seed, i) if eval_data is None else set()
        eval_docs += [d for j, d in enumerate(docs) if j in held]
        files.append((spec, [d for j, d in enumerate(docs) if j not in held], len(held)))
    for spec in eval_data or []:
        eval_docs += docs_of(spec.path)
    for item in bad.items:
        log(f"skipped bad line {item}")
    if bad.count:
        log(f"skipped {bad.count} bad data line(s); pass --strict-data to stop at the first instead")
    return Corpus(files, eval_docs, bad)


def build_dataset(data: list[DataSpec], tok, eos_id: int, seq_len: int, seed: int, *,
                  log: Callable[[str], None] = print, **kw) -> Dataset:
    """read_corpus then pack (keyword arguments as read_corpus's)."""
    return read_corpus(data, tok, eos_id, seed, log=log, **kw).pack(seq_len, seed, log)


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int):
    """(inputs, targets) LongTensors (B, S); untrained and padded targets are -100 (ignored)."""
    S = max(len(ids) for ids, _ in samples) - 1
    inputs = torch.full((len(samples), S), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), S), -100, dtype=torch.long)
    for b, (ids, train) in enumerate(samples):
        n = len(ids) - 1
        t = torch.as_tensor(ids, dtype=torch.long)
        inputs[b, :n] = t[:-1]
        targets[b, :n] = torch.where(torch.as_tensor(train[1:], dtype=torch.bool), t[1:], -100)
    return inputs, targets
