"""Megatron (Adept release) tensor names and kaki's, as data.

Megatron's `model` dict is nested (`model["language_model"]["embedding"]["word_embeddings"]
["weight"]`, while the encoder level holds flat dotted keys, reference §2.3); names here are the
nested keys joined with ".", as transformers' conversion script and llama.cpp flatten them.

No tensor is reshaped. The fused query_key_value rows are head-major with q, k, v interleaved
inside each head (row = h·3·d + j·d + i for j in q,k,v; reference §2.6), which is exactly the layout
kaki's model and transformers' Persimmon split with `view(heads, 3, head_dim)`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# (Megatron name fragment, kaki name fragment); `{n}` is a layer number. A fragment ending in "."
# covers that module's weight and bias.
MEGATRON_NAMES: list[tuple[str, str]] = [
    ("language_model.embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("language_model.encoder.layers.{n}.input_layernorm.", "model.layers.{n}.input_layernorm."),
    ("language_model.encoder.layers.{n}.self_attention.query_key_value.",
     "model.layers.{n}.self_attn.query_key_value."),
    ("language_model.encoder.layers.{n}.self_attention.q_layernorm.", "model.layers.{n}.self_attn.q_layernorm."),
    ("language_model.encoder.layers.{n}.self_attention.k_layernorm.", "model.layers.{n}.self_attn.k_layernorm."),
    ("language_model.encoder.layers.{n}.self_attention.dense.", "model.layers.{n}.self_attn.dense."),
    ("language_model.encoder.layers.{n}.post_attention_layernorm.", "model.layers.{n}.post_attention_layernorm."),
    ("language_model.encoder.layers.{n}.mlp.dense_h_to_4h.", "model.layers.{n}.mlp.dense_h_to_4h."),
    ("language_model.encoder.layers.{n}.mlp.dense_4h_to_h.", "model.layers.{n}.mlp.dense_4h_to_h."),
    ("language_model.encoder.final_layernorm.", "model.final_layernorm."),
    # The untied LM head: `GPTModel.word_embeddings` in the running model, saved under this name.
    ("word_embeddings_for_head.weight", "lm_head.weight"),
]

# Older Megatron spellings, accepted on read as Megatron's own load shims accept them.
READ_ALIASES: list[tuple[str, str]] = [
    ("language_model.transformer.", "language_model.encoder."),
    (".attention.", ".self_attention."),
]

# flash-attn 2.0's RotaryEmbedding keeps inv_freq as a persistent buffer, so the release has one
# per layer and Adept's strict load_state_dict wants it back. It is no weight: kaki recomputes it.
INV_FREQ = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.self_attention\.rotary_emb\.inv_freq$")
INV_FREQ_NAME = "language_model.encoder.layers.{n}.self_attention.rotary_emb.inv_freq"

# Where each flat name sits in the nested dict: the longest matching prefix is a chain of dict
# levels, the rest of the name is one flat key (Megatron's encoder is a plain state_dict()).
NESTING: list[tuple[str, ...]] = [
    ("language_model", "embedding", "word_embeddings"),
    ("language_model", "encoder"),
    ("word_embeddings_for_head",),
]


def _compile(pairs: list[tuple[str, str]]) -> list[tuple[re.Pattern, str]]:
    out = []
    for src, dst in pairs:
        pattern = "^" + re.escape(src).replace(re.escape("{n}"), r"(?P<n>\d+)")
        out.append((re.compile(pattern), dst.replace("{n}", r"\g<n>")))
    return out


_TO_KAKI = _compile(MEGATRON_NAMES)
_TO_MEGATRON = _compile([(k, m) for m, k in MEGATRON_NAMES])


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, repl in rules:
        new, count = pattern.subn(repl, key, count=1)
        if count:
            return new
    return None


def to_kaki(megatron_key: str) -> str | None:
    """kaki's name for a Megatron tensor name, or None when the table has no entry for it."""
    for old, new in READ_ALIASES:
        megatron_key = megatron_key.replace(old, new)
    return _rename(megatron_key, _TO_KAKI)


def to_megatron(kaki_key: str) -> str:
    name = _rename(kaki_key, _TO_MEGATRON)
    if name is None:
        raise KeyError(f"{kaki_key} has no Megatron name")
    return name


# Bounds on the walk over a release's `model` dict. Megatron's is 4 levels deep and Persimmon-8B's
# holds ~600 entries; a pickle is a graph, so a file of a few hundred bytes can hold a dict that
# contains itself, or 40 levels whose two children are one shared dict (2**40 paths).
MAX_DEPTH = 16
MAX_ENTRIES = 100_000


class TreeTooLarge(ValueError):
    """The nested dict is deeper or holds more entries than any Megatron checkpoint."""


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{dotted name: leaf}; TreeTooLarge past MAX_DEPTH levels or MAX_ENTRIES entries visited
    (a shared sub-dict counts each time it is reached, as the names it adds do)."""
    out: dict[str, Any] = {}
    visited = 0

    def walk(node: Mapping, prefix: str, depth: int) -> None:
        nonlocal visited
        if depth > MAX_DEPTH:
            raise TreeTooLarge(f"nested more than {MAX_DEPTH} levels (at {prefix[:200]}...)")
        for k, v in node.items():
            visited += 1
            if visited > MAX_ENTRIES:
                raise TreeTooLarge(f"more than {MAX_ENTRIES:,} entries")
            if isinstance(v, Mapping):
                walk(v, f"{prefix}{k}.", depth + 1)
            else:
                out[f"{prefix}{k}"] = v

    walk(tree, prefix, 1)
    return out


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """The nested `model` dict Megatron's GPTModel.state_dict_for_save_checkpoint produces."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        levels = max((p for p in NESTING if name.startswith(".".join(p) + ".")), key=len, default=None)
        if levels is None:
            raise KeyError(f"{name} has no place in Megatron's model dict")
        node = tree
        for level in levels:
            node = node.setdefault(level, {})
        node[name[len(".".join(levels)) + 1:]] = value
    return tree
