"""The model configuration: one dataclass for every family, read from a checkpoint's config.json.

Field names follow transformers' config.json. The families (Persimmon, GPT-NeoX, Llama, GPT-J)
differ only in the values of a few flags (norm kind, activation, residual layout, rotary fraction
and layout, q/k norm, biases, KV heads);
`FAMILIES` says, as data, where each family keeps them and what they default to.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaki.errors import CheckpointError


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float  # Llama's rms_norm_eps lands here too
    rms_norm: bool  # RMSNorm (Llama) instead of LayerNorm with bias
    qk_layernorm: bool  # Persimmon: LayerNorm over head_dim on q and k, shared by all heads
    partial_rotary_factor: float  # share of head_dim that is rotated (NeoX: rotary_pct)
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "linear"|"llama3", "factor": ...}
    use_parallel_residual: bool  # NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    attention_bias: bool
    mlp_bias: bool
    gated_mlp: bool  # Llama: down(act(gate(x)) * up(x))
    fused_qkv: bool  # one query_key_value GEMM, rows head-major [q_h, k_h, v_h] per head
    tie_word_embeddings: bool
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None  # the dtype the checkpoint's weights are stored in
    initializer_range: float = 0.02
    # GPT-J's flags, off for the other families:
    shared_layernorm: bool = False  # parallel residual with one norm: x + attn(ln1(x)) + mlp(ln1(x))
    rotary_interleaved: bool = False  # rotate pairs (x0, x1), (x2, x3)... instead of NeoX's halves
    rotary_dim: int | None = None  # rotated dims per head as a count; wins over partial_rotary_factor
    lm_head_bias: bool = False
    # Keys of the original config.json kaki does not model (architectures, id2label, ...):
    # written back unchanged on save so a round trip loses nothing.
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rotary_ndims(self) -> int:
        if self.rotary_dim is not None:
            return self.rotary_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    def num_parameters(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        norm = h if self.rms_norm else 2 * h
        attn = h * (q + 2 * kv) + q * h
        if self.attention_bias:
            attn += q + 2 * kv + h
        if self.qk_layernorm:
            attn += 4 * self.head_dim
        mlp = (3 if self.gated_mlp else 2) * h * i
        if self.mlp_bias:
            mlp += (2 if self.gated_mlp else 1) * i + h
        layer = attn + mlp + (1 if self.shared_layernorm else 2) * norm
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        if self.lm_head_bias:
            head += self.vocab_size
        return embed + L * layer + norm + head

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in FAMILIES:
            raise CheckpointError(
                f"model_type {model_type!r} is not supported; kaki runs {', '.join(sorted(FAMILIES))}"
            )
        family = FAMILIES[model_type]
        values: dict[str, Any] = dict(family["fixed"])
        used: set[str] = {"model_type"}
        for name, (keys, default) in family["keys"].items():
            values[name] = default
            for key in keys:
                if key in raw and raw[key] is not None:
                    values[name] = raw[key]
                    used.add(key)
                    break
        # transformers 5 moves rotary settings into `rope_parameters`; it wins when present.
        rope = raw.get("rope_parameters") or {}
        if rope:
            used.add("rope_parameters")
            if "rope_theta" in rope:
                values["rope_theta"] = rope["rope_theta"]
            if "partial_rotary_factor" in rope:
                values["partial_rotary_factor"] = rope["partial_rotary_factor"]
            if rope.get("rope_type", "default") != "default":
                values["rope_scaling"] = {k: v for k, v in rope.items()
                                          if k not in ("rope_theta", "partial_rotary_factor")}
        scaling = values.get("rope_scaling")
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ROPE_SCALINGS:
                raise CheckpointError(f"rope scaling {kind!r} is not supported; kaki implements "
                                      f"{', '.join(ROPE_SCALINGS)}")
            values["rope_scaling"] = {**scaling, "rope_type": kind}
        dtype = raw.get("dtype", raw.get("torch_dtype"))
        used.update({"dtype", "torch_dtype"})
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"):
            if key in raw:
                values[key] = raw[key]
                used.add(key)
        if values.get("head_dim") is None:
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        if values.get("intermediate_size") is None and values.get("hidden_size") is not None:
            # GPT-J's n_inner: null (its default) means the GPT-2 convention of 4 * n_embd.
            values["intermediate_size"] = 4 * values["hidden_size"]
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if values.get(k) is None]
        if missing:
            raise CheckpointError(f"config.json lacks {', '.join(missing)}; it is not a complete "
                                  f"{model_type} config")
        if values["num_attention_heads"] % values["num_key_value_heads"]:
            raise CheckpointError("num_attention_heads must be a multiple of num_key_value_heads")
        extra = {k: v for k, v in raw.items() if k not in used and not _is_family_key(k)}
        return cls(model_type=model_type, torch_dtype=dtype, extra=extra, **values)

    def to_dict(self) -> dict[str, Any]:
        """config.json in the transformers-4 form (top-level rope keys), which 4.x and 5.x both read."""
        family = FAMILIES[self.model_type]
        out: dict[str, Any] = dict(self.extra)
        out["model_type"] = self.model_type
        for name, (keys, _default) in family["keys"].items():
            out[keys[0]] = getattr(self, name)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"):
            out[key] = getattr(self, key)
        out["torch_dtype"] = self.torch_dtype
        out.setdefault("architectures", [family["architecture"]])
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


ROPE_SCALINGS = ("linear", "llama3")

# Per family: which config.json key holds each field (first match wins; the first name is the one
# written on save) and its default when absent, plus the flags that are fixed for the family.
FAMILIES: dict[str, dict[str, Any]] = {
    "persimmon": {
        "architecture": "PersimmonForCausalLM",
        "keys": {
            "vocab_size": (["vocab_size"], 262144),
            "hidden_size": (["hidden_size"], 4096),
            "intermediate_size": (["intermediate_size"], 16384),
            "num_hidden_layers": (["num_hidden_layers"], 36),
            "num_attention_heads": (["num_attention_heads"], 64),
            "max_position_embeddings": (["max_position_embeddings"], 16384),
            "hidden_act": (["hidden_act"], "relu2"),
            "layer_norm_eps": (["layer_norm_eps"], 1e-5),
            "qk_layernorm": (["qk_layernorm"], True),
            # The hub config has no partial_rotary_factor at all: 0.5 is what Persimmon trained with.
            "partial_rotary_factor": (["partial_rotary_factor"], 0.5),
            # transformers 5 regressed this default to 10000; Persimmon was trained with 25000.
            "rope_theta": (["rope_theta"], 25000.0),
            "rope_scaling": (["rope_scaling"], None),
            "tie_word_embeddings": (["tie_word_embeddings"], False),
        },
        "fixed": {"num_key_value_heads": None, "head_dim": None, "rms_norm": False,
                  "use_parallel_residual": False, "attention_bias": True, "mlp_bias": True,
                  "gated_mlp": False, "fused_qkv": True},
    },
    "gpt_neox": {
        "architecture": "GPTNeoXForCausalLM",
        "keys": {
            "vocab_size": (["vocab_size"], 50432),
            "hidden_size": (["hidden_size"], 6144),
            "intermediate_size": (["intermediate_size"], 24576),
            "num_hidden_layers": (["num_hidden_layers"], 44),
            "num_attention_heads": (["num_attention_heads"], 64),
            "max_position_embeddings": (["max_position_embeddings"], 2048),
            "hidden_act": (["hidden_act"], "gelu"),
            "layer_norm_eps": (["layer_norm_eps"], 1e-5),
            "partial_rotary_factor": (["rotary_pct", "partial_rotary_factor"], 0.25),
            "rope_theta": (["rotary_emb_base", "rope_theta"], 10000.0),
            "rope_scaling": (["rope_scaling"], None),
            "use_parallel_residual": (["use_parallel_residual"], True),
            "attention_bias": (["attention_bias"], True),
            "tie_word_embeddings": (["tie_word_embeddings"], False),
        },
        "fixed": {"num_key_value_heads": None, "head_dim": None, "rms_norm": False,
                  "qk_layernorm": False, "mlp_bias": True, "gated_mlp": False, "fused_qkv": True},
    },
    "llama": {
        "architecture": "LlamaForCausalLM",
        "keys": {
            "vocab_size": (["vocab_size"], 32000),
            "hidden_size": (["hidden_size"], 4096),
            "intermediate_size": (["intermediate_size"], 11008),
            "num_hidden_layers": (["num_hidden_layers"], 32),
            "num_attention_heads": (["num_attention_heads"], 32),
            "num_key_value_heads": (["num_key_value_heads"], None),
            "head_dim": (["head_dim"], None),
            "max_position_embeddings": (["max_position_embeddings"], 2048),
            "hidden_act": (["hidden_act"], "silu"),
            "layer_norm_eps": (["rms_norm_eps"], 1e-6),
            "rope_theta": (["rope_theta"], 10000.0),
            "rope_scaling": (["rope_scaling"], None),
            "attention_bias": (["attention_bias"], False),
            "mlp_bias": (["mlp_bias"], False),
            "tie_word_embeddings": (["tie_word_embeddings"], False),
        },
        "fixed": {"rms_norm": True, "qk_layernorm": False, "partial_rotary_factor": 1.0,
                  "use_parallel_residual": False, "gated_mlp": True, "fused_qkv": False},
    },
    "gptj": {
        "architecture": "GPTJForCausalLM",
        "keys": {
            "vocab_size": (["vocab_size"], 50400),
            "hidden_size": (["n_embd", "hidden_size"], 4096),
            "intermediate_size": (["n_inner"], None),
            "num_hidden_layers": (["n_layer", "num_hidden_layers"], 28),
            "num_attention_heads": (["n_head", "num_attention_heads"], 16),
            "max_position_embeddings": (["n_positions", "max_position_embeddings"], 2048),
            "hidden_act": (["activation_function"], "gelu_new"),
            "layer_norm_eps": (["layer_norm_epsilon"], 1e-5),
            # A count of dims, not a fraction: GPT-J-6B rotates 64 of each head's 256.
            "rotary_dim": (["rotary_dim"], 64),
            "tie_word_embeddings": (["tie_word_embeddings"], False),
        },
        # transformers' GPT-J hard-codes rope base 10000 and has no bias on q/k/v/out_proj, but
        # has one on fc_in/fc_out and the lm_head.
        "fixed": {"num_key_value_heads": None, "head_dim": None, "rms_norm": False,
                  "qk_layernorm": False, "partial_rotary_factor": 1.0, "rope_theta": 10000.0,
                  "rope_scaling": None, "use_parallel_residual": True, "shared_layernorm": True,
                  "rotary_interleaved": True, "lm_head_bias": True, "attention_bias": False,
                  "mlp_bias": True, "gated_mlp": False, "fused_qkv": False},
    },
}


def _is_family_key(key: str) -> bool:
    return any(key in names for fam in FAMILIES.values() for names, _ in fam["keys"].values())


def read_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json; point --model at a transformers model "
                              "directory (config.json + weights) or an Adept release directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from the original checkpoint")
    return ModelConfig.from_dict(raw)
