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


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, name + "."))
        else:
            out[name] = v
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
