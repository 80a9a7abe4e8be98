"""Tokenizers, with one rule for which file is the truth.

- `tokenizer.json` present: the `tokenizers` library runs it, so ids equal transformers' fast
  tokenizer on the same directory.
- only a sentencepiece `tokenizer.model` (Persimmon's published checkpoints, Adept's release):
  sentencepiece itself runs it, because that is what the model was trained with and what Adept's
  server uses. transformers 5 instead converts such a Unigram model to a BPE tokenizer, which
  segments many lines differently (runs of spaces above all); kaki does not follow it there.

BOS/EOS come from tokenizer_config.json, then generation_config.json/config.json. Whether BOS is
prepended: with tokenizer.json, whatever its post-processor does (transformers 5 ignores
`add_bos_token` there); with tokenizer.model, `add_bos_token` from tokenizer_config.json.
"""

from __future__ import annotations

from itertools import accumulate
from pathlib import Path
from typing import Iterable

from kaki.config import read_json
from kaki.errors import CheckpointError


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """encode/decode between text and ids; `bos_id`, `eos_ids`, `add_bos` from the directory."""

    def __init__(self, backend, kind: str, bos_id: int | None, eos_ids: list[int], add_bos: bool,
                 pad_id: int | None, chat_template: str | None = None, special_ids: Iterable[int] = ()):
        self.backend, self.kind = backend, kind
        self.bos_id, self.eos_ids, self.add_bos, self.pad_id = bos_id, eos_ids, add_bos, pad_id
        self.chat_template = chat_template
        self.special_ids = set(special_ids) | set(eos_ids) | ({bos_id} if bos_id is not None else set())

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return self.backend.get_piece_size()
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS is prepended when `add_bos` (default: the directory's setting)."""
        add_bos = self.add_bos if add_bos is None else add_bos
        if self.kind == "sentencepiece":
            ids = self.backend.encode(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def encode_with_starts(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` (no BOS) and where each token starts, in UTF-8 bytes of `text`
        (bytes, not characters: sentencepiece reports bytes, and a byte-fallback piece can start
        inside a character)."""
        if self.kind == "sentencepiece":
            proto = self.backend.encode(text, return_type="proto")
            return [p.id for p in proto.pieces], [p.begin for p in proto.pieces]
        enc = self.backend.encode(text, add_special_tokens=False)
        # tokenizers gives character offsets; convert to bytes so both backends answer alike.
        char_to_byte = list(accumulate((len(c.encode()) for c in text), initial=0))
        return list(enc.ids), [char_to_byte[s] for s, _ in enc.offsets]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.special_ids]
        if self.kind == "sentencepiece":
            # Checkpoints pad the embedding past the tokenizer (Adept's release: to a multiple of
            # 128); a model may still sample those rows. They carry no text, and sentencepiece
            # raises IndexError on them, so they are dropped as tokenizers' decode drops them.
            n = self.backend.get_piece_size()
            return self.backend.decode([i for i in ids if 0 <= i < n])
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i: int) -> str:
        if self.kind == "sentencepiece":
            return self.backend.id_to_piece(i) if 0 <= i < self.backend.get_piece_size() else ""
        return self.backend.id_to_token(i) or ""

    def token_to_id(self, token: str) -> int | None:
        if self.kind == "sentencepiece":
            i = self.backend.piece_to_id(token)
            return None if i == self.backend.unk_id() and token != self.backend.id_to_piece(i) else i
        return self.backend.token_to_id(token)

    @classmethod
    def from_dir(cls, model_dir: str | Path, config=None) -> "Tokenizer":
        d = Path(model_dir)
        tok_cfg = _read_json(d / "tokenizer_config.json")
        gen_cfg = _read_json(d / "generation_config.json")
        special_map = _read_json(d / "special_tokens_map.json")
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer
            try:
                backend = HFTokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:
                raise CheckpointError(f"{d / 'tokenizer.json'} could not be read ({e})")
            kind = "tokenizers"
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            backend = _byte_level_bpe(d, tok_cfg, special_map)
            kind = "tokenizers"
        else:
            spm_files = [d / "tokenizer.model"] + sorted(d.glob("*.model"))
            spm_file = next((f for f in spm_files if f.is_file()), None)
            if spm_file is None:
                raise CheckpointError(f"{d} has no tokenizer (tokenizer.json or a sentencepiece "
                                      "tokenizer.model); copy the tokenizer files next to config.json")
            import sentencepiece as spm
            backend = spm.SentencePieceProcessor()
            try:
                backend.Load(str(spm_file))
            except Exception as e:
                raise CheckpointError(f"{spm_file} is not a sentencepiece model ({e})")
            kind = "sentencepiece"
        tok = cls(backend, kind, None, [], False, None)

        def lookup(name: str) -> int | None:
            content = _token_content(tok_cfg.get(name)) or _token_content(special_map.get(name))
            return tok.token_to_id(content) if content else None

        def from_configs(key: str):
            for source in (gen_cfg, {} if config is None else {key: getattr(config, key, None)}):
                if source.get(key) is not None:
                    return source[key]
            return None

        bos = lookup("bos_token")
        if bos is None:
            bos = from_configs("bos_token_id")
        eos = from_configs("eos_token_id")
        eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
        eos_tok = lookup("eos_token")
        if eos_tok is not None and eos_tok not in eos_ids:
            eos_ids.append(eos_tok)
        pad = lookup("pad_token")
        if pad is None:
            pad = from_configs("pad_token_id")
        add_bos = bool(tok_cfg.get("add_bos_token", False))
        if kind == "tokenizers":
            # tokenizer.json's own post-processor decides, as in transformers 5, which drops
            # add_bos_token when tokenizer.json exists (Llama 3 prepends BOS only there).
            add_bos = _post_processor_prepends(backend, bos)
        added = [i for i, t in backend.get_added_tokens_decoder().items()
                 if t.special] if kind == "tokenizers" else []
        if kind == "sentencepiece":
            added = [i for i in range(backend.get_piece_size()) if backend.is_control(i)]
        return cls(backend, kind, bos, eos_ids, add_bos, pad, tok_cfg.get("chat_template"), added)


def _byte_level_bpe(d: Path, tok_cfg: dict, special_map: dict):
    """GPT-2's byte-level BPE from `vocab.json` + `merges.txt`, for the GPT-2/GPT-J checkpoints
    published without a tokenizer.json (what transformers' GPT2TokenizerFast builds from them):
    no prefix space, no normalizer; the special tokens the configs name (and added_tokens.json)
    are matched whole, never split."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    try:
        bpe = models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt"))
    except Exception as e:
        raise CheckpointError(f"{d / 'vocab.json'} and merges.txt do not form a BPE tokenizer ({e})")
    backend = HFTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    names = {_token_content(cfg.get(key)) for cfg in (tok_cfg, special_map)
             for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    extra = _read_json(d / "added_tokens.json")  # {token: id}, ids after the BPE vocabulary
    for token in sorted(extra, key=extra.get):
        backend.add_tokens([AddedToken(token, special=False, normalized=False)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in sorted(n for n in names if n)])
    return backend


def _post_processor_prepends(backend, bos: int | None) -> bool:
    if bos is None:
        return False
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    return len(full) > len(plain) and full[0] == bos


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    raw = read_json(path, "restore it from the original checkpoint")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object; restore it from the original checkpoint")
    return raw


class TextStream:
    """Turns one sequence's generated ids into text pieces, once, for every caller.

    Decodes a sliding window that starts a few tokens back, so sentencepiece's leading-space rule
    and multi-token characters come out right; text ending in U+FFFD (an incomplete UTF-8 byte
    sequence from byte-fallback pieces) is held back until the character completes. Stop strings
    are matched on the text; the last `max(len(stop)) - 1` characters are held back so a stop
    string split across tokens is caught before any of it is emitted.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] | None = None):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-4:])  # context for the first pieces' spacing
        self.prefix = 0
        self.read = len(self.ids)
        self.stop = [s for s in (stop or []) if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # longest tail worth holding
        self.pending = ""  # decoded but not yet emitted (may hold a stop-string prefix)
        self.text = ""  # everything emitted
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that may be shown now ('' while waiting)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prev = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        if full.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 character: wait for its remaining bytes
        new = full[len(prev):]
        # Slide the window: the last fully decoded token is enough context for the next one.
        self.ids = self.ids[self.read:]
        self.prefix, self.read = 0, len(self.ids)
        return self._emit(new)

    def _emit(self, new: str) -> str:
        self.pending += new
        for s in self.stop:
            at = self.pending.find(s)
            if at >= 0:
                self.pending = self.pending[:at]
                self.stopped = True
                return self._flush()
        # Hold back only a tail that could still grow into a stop string.
        p, cut = self.pending, len(self.pending)
        for i in range(max(0, len(p) - self.hold), len(p)):
            if any(s.startswith(p[i:]) for s in self.stop):
                cut = i
                break
        out, self.pending = p[:cut], p[cut:]
        self.text += out
        return out

    def _flush(self) -> str:
        out, self.pending = self.pending, ""
        self.text += out
        return out

    def finish(self) -> str:
        """End of generation: release whatever was held back."""
        if self.stopped:
            return ""
        return self._flush()
