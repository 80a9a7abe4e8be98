"""`kaki train-tokenizer`: a sentencepiece Unigram tokenizer with byte fallback, Persimmon's kind.

Choices, and why:
- byte_fallback: a character never seen in training becomes <0xNN> byte pieces instead of <unk>,
  so every string round-trips (emoji, CJK, stray control bytes).
- normalization "identity", remove_extra_whitespaces off, whitespace-only pieces allowed: code
  indentation, runs of spaces and newlines are kept exactly (`decode(encode(t)) == t`), and
  "\n", "\n\n" and runs of spaces can become single pieces.
- no dummy prefix: sentencepiece would otherwise prepend a space to every encoded string, so the
  pieces of a chat prompt would differ from the same text inside a longer document.
- split_digits: numbers are spelled digit by digit (as Llama and Persimmon do), which helps small
  models with arithmetic-looking text and keeps the vocabulary for words.
- Special tokens: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), no pad by default (training packs, so it
  never pads). All of them are parameters; pass the same text for --bos-token and --eos-token
  to get a single end-of-text token as Persimmon's |ENDOFTEXT| is.

Output: tokenizer.model + tokenizer_config.json (+ special_tokens_map.json), the layout of
Persimmon's published checkpoints that `kaki.tokenizer.Tokenizer.from_dir` reads.
"""

from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from kaki.checkpoint import write_atomically
from kaki.errors import KakiError

# sentencepiece drops training "sentences" longer than this many bytes; documents are cut into
# paragraph-aligned pieces below it.
MAX_SENTENCE_BYTES = 4096
SENTENCE_TARGET_BYTES = 2000


def text_chunks(text: str, target: int = SENTENCE_TARGET_BYTES) -> Iterator[str]:
    """Cut a document into chunks of about `target` bytes at blank lines (then lines, then hard),
    keeping the newlines inside each chunk so the tokenizer learns "\n" and "\n\n" pieces."""
    buf = ""
    for para in text.split("\n\n"):
        piece = para + "\n\n"
        if len((buf + piece).encode()) > target and buf:
            yield buf
            buf = ""
        while len(piece.encode()) > MAX_SENTENCE_BYTES:
            # A huge paragraph (a table, a minified line): cut it at a line break if it has one.
            cut = piece.rfind("\n", 0, target)
            cut = cut + 1 if cut > 0 else target // 4  # chars; //4 keeps it under target bytes
            yield piece[:cut]
            piece = piece[cut:]
        buf += piece
    if buf.strip():
        yield buf


def read_training_text(files: Iterable[str | Path]) -> Iterator[str]:
    """Plain text files as they are; JSONL files by their `text` field, or their `messages`
    contents. A file that cannot be read is an error, not something to skip quietly."""
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise KakiError(f"{path} does not exist or is not a file")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise KakiError(f"{path} is not UTF-8 text ({e}); convert it first") from None
        if path.suffix != ".jsonl":
            yield raw
            continue
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # kaki train reports bad lines; the tokenizer only needs the good text
            if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                yield rec["text"]
            elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                yield "\n\n".join(str(m.get("content", "")) for m in rec["messages"] if isinstance(m, dict))


def train_tokenizer(files: list[str | Path], vocab_size: int, out_dir: str | Path, *,
                    unk_token: str = "<unk>", bos_token: str | None = "<s>", eos_token: str = "</s>",
                    pad_token: str | None = None, add_bos: bool = True, split_digits: bool = True,
                    user_symbols: list[str] | None = None, max_sentences: int = 2_000_000,
                    seed: int = 0, threads: int | None = None) -> Path:
    """Train and write the tokenizer directory; returns its path. Written atomically."""
    if vocab_size < 300:
        raise KakiError(f"--vocab-size {vocab_size} is too small: byte fallback alone needs 256 "
                        "pieces plus the special tokens; use at least 300 (about 8000 for a small model)")
    sentences = [c for doc in read_training_text(files) for c in text_chunks(doc)]
    if not sentences:
        raise KakiError("the training files hold no text")
    if len(sentences) > max_sentences:
        sentences = random.Random(seed).sample(sentences, max_sentences)

    # Special pieces in a fixed order: unk first (sentencepiece requires it), then bos/eos/pad.
    specials: list[str] = [unk_token]
    for t in (bos_token, eos_token, pad_token):
        if t is not None and t not in specials:
            specials.append(t)
    ids = {t: i for i, t in enumerate(specials)}
    # sentencepiece refuses one piece in two roles: a shared BOS/EOS is its EOS piece, and
    # tokenizer_config.json names it as bos_token too.
    spm_bos = bos_token if bos_token is not None and bos_token != eos_token else None
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
            model_type="unigram", byte_fallback=True, character_coverage=0.99995,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=split_digits,
            max_sentence_length=MAX_SENTENCE_BYTES, unk_id=0, unk_piece=unk_token,
            bos_id=ids[spm_bos] if spm_bos else -1, bos_piece=spm_bos or "<s>",
            eos_id=ids[eos_token], eos_piece=eos_token,
            pad_id=ids.get(pad_token, -1) if pad_token else -1, pad_piece=pad_token or "<pad>",
            user_defined_symbols=user_symbols or [], hard_vocab_limit=False,
            num_threads=threads or os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        raise KakiError(f"sentencepiece could not train on this text: {e}") from None

    def write(tmp: Path) -> None:
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
        special_map = {"unk_token": unk_token, "eos_token": eos_token}
        if bos_token:
            special_map["bos_token"] = bos_token
        if pad_token:
            special_map["pad_token"] = pad_token
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": bool(add_bos and bos_token),
                  "add_eos_token": False, "bos_token": bos_token, "eos_token": eos_token,
                  "unk_token": unk_token, "pad_token": pad_token, "clean_up_tokenization_spaces": False,
                  "legacy": False, "add_prefix_space": False, "model_max_length": 1 << 30}
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")

    return write_atomically(out_dir, write)
