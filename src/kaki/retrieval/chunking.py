"""Chunking: a section's text -> passages.

- `sentences` (the default, N=3): consecutive groups of N sentences, as OpenChatKit's Wikipedia
  index holds three-sentence snippets; `overlap` sentences are repeated between neighbours.
- `tokens`: windows of N tokens (the embedder's tokenizer, or words and punctuation without one)
  that overlap by M tokens.
- `none`: one passage per section (a JSONL record, or a file's stretch under one heading).

A chunk is always a slice of the section's text (start, end), so its source line is known. A
paragraph boundary always ends a sentence, and a code-like paragraph (indented, or with no
sentence end) longer than MAX_SENTENCE_CHARS is cut at line breaks so no "sentence" is huge.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Callable

from kaki.errors import KakiError

MODES = ("sentences", "tokens", "none")
MAX_SENTENCE_CHARS = 600
# Bigger windows than this are a typo or a foreign index, not a chunking anyone wants.
MAX_CHUNK_SIZE = 1_000_000
# A period after one of these does not end a sentence.
ABBREVIATIONS = {"e.g", "i.e", "etc", "vs", "cf", "mr", "mrs", "ms", "dr", "prof", "st", "no", "fig", "approx",
                 "resp", "ca", "al", "jr", "sr", "inc", "ltd", "co", "ed", "vol", "pp", "p"}
_SENT_END = re.compile(r"[.!?][\"')\]]*\s+")
_WORD_BEFORE = re.compile(r"([\w.]+)[.!?][\"')\]]*\s+$")
_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Chunking:
    mode: str = "sentences"
    size: int = 3
    overlap: int = 0

    def __post_init__(self):
        # Values may come from an index file someone else wrote: check types before comparing.
        if not isinstance(self.mode, str):
            raise KakiError(f"chunking mode must be a string, got {type(self.mode).__name__}")
        for name in ("size", "overlap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or abs(v) > MAX_CHUNK_SIZE:
                raise KakiError(f"chunk {name} must be an integer of at most {MAX_CHUNK_SIZE:,}, got {str(v)[:40]!r}")
        if self.mode not in MODES:
            raise KakiError(f"unknown chunking {self.mode[:40]!r}; use one of {', '.join(MODES)}")
        if self.mode != "none" and self.size < 1:
            raise KakiError(f"chunk size must be at least 1, got {self.size}")
        if self.overlap < 0 or (self.mode != "none" and self.overlap >= self.size):
            raise KakiError(f"--overlap must be between 0 and the chunk size - 1 ({self.size - 1}), got {self.overlap}")

    def describe(self) -> str:
        if self.mode == "none":
            return "whole sections"
        unit = "sentences" if self.mode == "sentences" else "tokens"
        return f"{self.size} {unit}" + (f", overlap {self.overlap}" if self.overlap else "")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Chunking":
        try:
            d = json.loads(text)
        except (ValueError, RecursionError, TypeError) as e:
            raise KakiError(f"chunking is not valid JSON ({type(e).__name__})")
        if not isinstance(d, dict) or not set(d) <= {"mode", "size", "overlap"}:
            raise KakiError("chunking must be a JSON object with mode, size and overlap")
        return cls(**d)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text`; paragraphs (blank-line separated) never share one."""
    spans: list[tuple[int, int]] = []
    for pstart, pend in _paragraph_spans(text):
        para = text[pstart:pend]
        if _code_like(para):
            spans += [(pstart + a, pstart + b) for a, b in _cut_lines(para)]
            continue
        start = 0
        for m in _SENT_END.finditer(para):
            end = m.end()
            if end >= len(para):
                break
            w = _WORD_BEFORE.search(para[:end])
            word = w.group(1).lower() if w else ""
            nxt = para[end]
            # A sentence ends before a capital, digit, quote or markup, and not after an
            # abbreviation or a single initial ("J. Smith").
            if word in ABBREVIATIONS or (len(word) == 1 and word.isalpha()) or not (
                    nxt.isupper() or nxt.isdigit() or nxt in "\"'([`*:>-"):
                continue
            spans.append((pstart + start, pstart + m.start() + len(m.group().rstrip())))
            start = end
        if para[start:].strip():
            spans.append((pstart + start, pstart + len(para.rstrip())))
    return list(_split_long(text, spans))


def _paragraph_spans(text: str) -> list[tuple[int, int]]:
    out = []
    pos = 0
    for m in re.finditer(r"\n[ \t]*\n\s*", text):
        if text[pos:m.start()].strip():
            out.append((pos, m.start()))
        pos = m.end()
    if text[pos:].strip():
        out.append((pos, len(text.rstrip())))
    return out


def _code_like(para: str) -> bool:
    lines = para.splitlines()
    return len(lines) > 1 and sum(ln.startswith((" ", "\t", ">>>", "$")) for ln in lines) * 2 >= len(lines)


def _cut_lines(para: str) -> list[tuple[int, int]]:
    """A code paragraph as pieces of whole lines up to MAX_SENTENCE_CHARS each."""
    out = []
    start = 0
    pos = 0
    for ln in para.splitlines(keepends=True):
        if pos - start + len(ln) > MAX_SENTENCE_CHARS and pos > start:
            out.append((start, pos - 1 if para[pos - 1] == "\n" else pos))
            start = pos
        pos += len(ln)
    if para[start:].strip():
        out.append((start, len(para.rstrip())))
    return out


def _split_long(text: str, spans: list[tuple[int, int]]):
    """Prose "sentences" over MAX_SENTENCE_CHARS (lists, tables, run-ons) cut at whitespace."""
    for a, b in spans:
        while b - a > MAX_SENTENCE_CHARS:
            cut = text.rfind(" ", a, a + MAX_SENTENCE_CHARS)
            cut = cut if cut > a else a + MAX_SENTENCE_CHARS
            yield a, cut
            a = cut + 1
        if text[a:b].strip():
            yield a, b


def word_offsets(text: str) -> list[tuple[int, int]]:
    """Token spans without a tokenizer: words and single punctuation marks."""
    return [m.span() for m in _TOKEN.finditer(text)]


def chunk_spans(text: str, chunking: Chunking,
                token_offsets: Callable[[str], list[tuple[int, int]]] | None = None) -> list[tuple[int, int]]:
    """(start, end) of each passage of `text` under `chunking`."""
    if not text.strip():
        return []
    if chunking.mode == "none":
        return [(0, len(text.rstrip()))]
    units = sentence_spans(text) if chunking.mode == "sentences" else (token_offsets or word_offsets)(text)
    units = [(a, b) for a, b in units if b > a]
    step = chunking.size - chunking.overlap
    out = []
    for i in range(0, len(units), step):
        group = units[i:i + chunking.size]
        out.append((group[0][0], group[-1][1]))
        if i + chunking.size >= len(units):
            break
    return out
