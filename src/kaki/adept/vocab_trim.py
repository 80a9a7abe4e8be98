"""`--trim-vocab`: drop the embedding rows the tokenizer can never produce.

The seed: "It should be possible to fit the model on a 40GB card by removing the unused
embeddings"; Adept's blog puts about 70k of the 262,144 ids aside for multimodal use. With
hidden 4096 in bf16 every 1,000 rows removed from both matrices saves 16 MB.

An id is never produced by sentencepiece's `encode` when
- it is past the tokenizer's last piece (Megatron pads the embedding to a multiple of 128 rows);
- its piece type is UNUSED (the segmenter skips such pieces) or CONTROL (never matched in text,
  only ever inserted by id);
unless the model uses it by id: BOS, EOS, pad, and sentencepiece's own unk/bos/eos/pad pieces stay.
NORMAL, USER_DEFINED, BYTE (byte fallback) and UNKNOWN pieces are reachable and stay. Scores are
not a criterion: in a Unigram lattice a NORMAL piece wins wherever no other segmentation covers
its text, whatever its score, so no score threshold proves a piece unreachable.

Ids stay consistent. When the dropped ids are one block at the top, the matrices are truncated and
every id keeps its number (trailing UNUSED/CONTROL pieces are cut from the tokenizer too). Otherwise
the sentencepiece model is rewritten without the dropped pieces, ids are renumbered in order, and
the map from new ids to the original ones is stored next to the weights (`vocab_map.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from kaki.adept.bundle import Bundle
from kaki.checkpoint import TensorSource
from kaki.errors import KakiError

# Megatron's make-vocab-size-divisible-by default: Adept's code rebuilds the padded vocab size from
# the tokenizer and must find the same row count; also a GEMM width GPUs like.
VOCAB_MULTIPLE = 128
VOCAB_MAP_FILE = "vocab_map.json"
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass
class TrimPlan:
    rows: int  # embedding rows before
    keep: list[int]  # ids of the untrimmed model that stay, ascending: new id i is keep[i]
    dropped: dict[str, int] = field(default_factory=dict)  # why, how many

    @property
    def truncation(self) -> bool:
        return self.keep == list(range(len(self.keep)))

    @property
    def removed(self) -> int:
        return self.rows - len(self.keep)


def unreachable_ids(sp, rows: int, used: set[int]) -> dict[str, list[int]]:
    """Ids `encode` never produces, by reason; `used` are ids the model needs by number."""
    n = sp.get_piece_size()
    special = {i for i in (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) if i >= 0} | used
    out = {"past the tokenizer": list(range(n, rows)), "unused pieces": [], "control pieces": []}
    for i in range(min(n, rows)):
        if i in special:
            continue
        if sp.is_unused(i):
            out["unused pieces"].append(i)
        elif sp.is_control(i):
            out["control pieces"].append(i)
    return out


def plan_trim(spm_bytes: bytes, rows: int, used: set[int], multiple: int = VOCAB_MULTIPLE) -> TrimPlan:
    import sentencepiece as spm

    if multiple < 1:
        raise KakiError(f"--vocab-multiple must be at least 1, not {multiple}")
    sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    if sp.get_piece_size() > rows:
        raise KakiError(f"the tokenizer has {sp.get_piece_size()} pieces but the embedding only {rows} rows; "
                        "they do not belong together")
    by_reason = unreachable_ids(sp, rows, used)
    drop = sorted(i for ids in by_reason.values() for i in ids)
    reachable = sorted(set(range(rows)) - set(drop))
    target = min(rows, -(-len(reachable) // multiple) * multiple)
    # Round up to `multiple` with dropped ids right after the last reachable one first, so a block
    # at the top stays a plain truncation.
    top = max(reachable, default=-1)
    pad = ([i for i in drop if i > top] + [i for i in drop if i < top])[:target - len(reachable)]
    keep = sorted(reachable + pad)
    padded = set(pad)
    dropped = {reason: sum(1 for i in ids if i not in padded) for reason, ids in by_reason.items()}
    return TrimPlan(rows=rows, keep=keep, dropped={k: v for k, v in dropped.items() if v})


def rewrite_spm(spm_bytes: bytes, keep: list[int]) -> bytes:
    """The sentencepiece model with only the pieces whose ids are in `keep` (renumbered in order)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        raise KakiError("rewriting the sentencepiece model needs protobuf: pip install 'kaki[adept]'") from None
    import sentencepiece as spm

    model = pb.ModelProto()
    model.ParseFromString(spm_bytes)
    kept = [i for i in keep if i < len(model.pieces)]
    new = pb.ModelProto()
    new.CopyFrom(model)
    del new.pieces[:]
    for i in kept:
        new.pieces.add().CopyFrom(model.pieces[i])
    renumber = {old: i for i, old in enumerate(kept)}
    spec = new.trainer_spec
    for name in ("unk_id", "bos_id", "eos_id", "pad_id"):
        old = getattr(spec, name)
        if old >= 0 and renumber.get(old, -1) != old:
            setattr(spec, name, renumber.get(old, -1))
    spec.vocab_size = len(kept)
    out = new.SerializeToString()
    # Loading it back proves sentencepiece accepts it and that every kept piece kept its text.
    sp = spm.SentencePieceProcessor(model_proto=out)
    old_sp = spm.SentencePieceProcessor(model_proto=spm_bytes)
    assert all(sp.id_to_piece(i) == old_sp.id_to_piece(o) for i, o in enumerate(kept))
    return out


def _rows(src: TensorSource, keep: list[int], truncation: bool) -> TensorSource:
    if truncation:
        load = lambda: src.load()[: len(keep)]  # noqa: E731  a view: no copy until it is written
    else:
        index = torch.tensor(keep)
        load = lambda: src.load().index_select(0, index)  # noqa: E731
    return TensorSource((len(keep), *src.shape[1:]), src.dtype, load, src.origin)


def trim_vocab(bundle: Bundle, multiple: int = VOCAB_MULTIPLE) -> tuple[Bundle, TrimPlan]:
    """The bundle without unreachable embedding rows, and what was done."""
    if bundle.spm is None:
        raise KakiError(f"--trim-vocab needs a sentencepiece tokenizer (tokenizer.model); {bundle.origin} "
                        "has none")
    cfg = bundle.cfg
    used = {i for i in (bundle.bos_id, bundle.pad_id, *bundle.eos_ids, cfg.bos_token_id, cfg.pad_token_id,
                        *cfg.eos_token_ids) if i is not None}
    plan = plan_trim(bundle.spm, cfg.vocab_size, used, multiple)
    if plan.removed == 0:
        return bundle, plan
    new_id = {old: i for i, old in enumerate(plan.keep)}
    sources = dict(bundle.sources)
    for name in EMBEDDINGS:
        if name in sources:
            sources[name] = _rows(sources[name], plan.keep, plan.truncation)
    import sentencepiece as spm
    pieces = spm.SentencePieceProcessor(model_proto=bundle.spm).get_piece_size()
    spm_bytes = bundle.spm if plan.keep[:pieces] == list(range(pieces)) else rewrite_spm(bundle.spm, plan.keep)

    def remap(i):
        if isinstance(i, list):
            return [new_id[x] for x in i]
        return None if i is None else new_id[i]

    new_cfg = cfg.replace(vocab_size=len(plan.keep), bos_token_id=remap(cfg.bos_token_id),
                          eos_token_id=remap(cfg.eos_token_id), pad_token_id=remap(cfg.pad_token_id))
    if bundle.vocab_map is not None:  # trimming a trimmed model: map straight to the original ids
        vocab_map = [bundle.vocab_map[i] for i in plan.keep]
    else:
        vocab_map = None if plan.truncation else list(plan.keep)
    return bundle.replace(
        cfg=new_cfg, sources=sources, spm=spm_bytes, bos_id=remap(bundle.bos_id), eos_ids=remap(bundle.eos_ids),
        pad_id=remap(bundle.pad_id), vocab_map=vocab_map,
        original_vocab_size=bundle.original_vocab_size or plan.rows,
        tokenizer_changed=bundle.tokenizer_changed or spm_bytes is not bundle.spm or not plan.truncation,
        vocab_file=bundle.vocab_file if spm_bytes is bundle.spm else None), plan


# ----------------------------------------------------------------------------- the id map on disk

def vocab_map_json(bundle: Bundle) -> str:
    """new id i -> original id, stored as [start, stop) runs of original ids (a few lines, not 190k)."""
    runs: list[list[int]] = []
    for old in bundle.vocab_map or []:
        if runs and runs[-1][1] == old:
            runs[-1][1] += 1
        else:
            runs.append([old, old + 1])
    return json.dumps({"original_vocab_size": bundle.original_vocab_size, "kept_id_ranges": runs}, indent=1) + "\n"


def read_vocab_map(text: str) -> tuple[list[int], int]:
    raw = json.loads(text)
    ids = [i for start, stop in raw["kept_id_ranges"] for i in range(start, stop)]
    return ids, raw["original_vocab_size"]
