"""The model configuration: one dataclass for every family, read from a checkpoint's config.json.

Field names follow transformers' config.json. The families (Persimmon, GPT-NeoX, Llama, GPT-J)
differ only in the values of a few flags (norm kind, activation, residual layout, rotary fraction
and layout, q/k norm, biases, KV heads);
`FAMILIES` says, as data, where each family keeps them and what they default to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

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
    def from_dict(cls, raw: Any, source: str = "config.json", spelling: dict[str, str] | None = None) -> "ModelConfig":
        """Every value is checked before anything is derived from it, so a damaged or hostile
        config is a CheckpointError naming the key (as `source` spells it, or as `spelling` maps
        field names to it) and never a TypeError, a ZeroDivisionError or minutes of building."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source} holds a JSON {_json_type(raw)}, not an object of settings; "
                                  "restore it from the original checkpoint")
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            raise CheckpointError(
                f"model_type {model_type!r:.60} is not supported; kaki runs {', '.join(sorted(FAMILIES))}"
            )
        family = FAMILIES[model_type]
        values: dict[str, Any] = dict(family["fixed"])
        spelled: dict[str, str] = dict(spelling or {})
        used: set[str] = {"model_type"}
        for name, (keys, default) in family["keys"].items():
            values[name] = default
            for key in keys:
                if key in raw and raw[key] is not None:
                    values[name] = raw[key]
                    spelled.setdefault(name, key)
                    used.add(key)
                    break
        # transformers 5 moves rotary settings into `rope_parameters`; it wins when present.
        rope = raw.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise CheckpointError(f"{source}: rope_parameters must be an object, not {_show(rope)}")
        if rope:
            used.add("rope_parameters")
            for key in ("rope_theta", "partial_rotary_factor"):
                if key in rope:
                    values[key] = rope[key]
                    spelled[key] = f"rope_parameters.{key}"
            if rope.get("rope_type", "default") != "default":
                values["rope_scaling"] = {k: v for k, v in rope.items()
                                          if k not in ("rope_theta", "partial_rotary_factor")}
                spelled["rope_scaling"] = "rope_parameters"
        if values.get("rope_scaling"):
            values["rope_scaling"] = _rope_scaling(values["rope_scaling"], source,
                                                   spelled.get("rope_scaling", "rope_scaling"))
        dtype = raw.get("dtype", raw.get("torch_dtype"))
        used.update({"dtype", "torch_dtype"})
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range"):
            if key in raw:
                values[key] = raw[key]
                used.add(key)
        missing = [spelled.get(k, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                 "num_attention_heads") if values.get(k) is None]
        if missing:
            raise CheckpointError(f"{source} lacks {', '.join(missing)}; it is not a complete "
                                  f"{model_type} config")
        for name, value in {**values, "torch_dtype": dtype}.items():
            if value is not None or name in REQUIRED:
                check_value(name, value, source, spelled.get(name, name))
        h, heads = values["hidden_size"], values["num_attention_heads"]
        if values.get("head_dim") is None:
            if h % heads:
                raise CheckpointError(f"{source}: {spelled.get('hidden_size', 'hidden_size')} ({h}) must be a "
                                      f"multiple of {spelled.get('num_attention_heads', 'num_attention_heads')} "
                                      f"({heads}), which sets the head dimension")
            values["head_dim"] = h // heads
        if values.get("intermediate_size") is None:
            # GPT-J's n_inner: null (its default) means the GPT-2 convention of 4 * n_embd.
            values["intermediate_size"] = 4 * h
        if values.get("num_key_value_heads") is None:
            values["num_key_value_heads"] = heads
        if heads % values["num_key_value_heads"]:
            raise CheckpointError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                                  f"num_key_value_heads ({values['num_key_value_heads']})")
        extra = {k: v for k, v in raw.items() if k not in used and not _is_family_key(k)}
        cfg = cls(model_type=model_type, torch_dtype=dtype, extra=extra, **values)
        cfg._check_shapes(source, spelled)
        return cfg

    def _check_shapes(self, source: str, spelled: dict[str, str]) -> None:
        """What the values imply together: rotary dimensions that fit a head, and a size kaki can build."""
        rot = self.rotary_ndims
        if self.rotary_dim is not None and rot > self.head_dim:
            raise CheckpointError(f"{source}: {spelled.get('rotary_dim', 'rotary_dim')} ({rot}) must be at most "
                                  f"the head dimension ({self.head_dim})")
        if rot % 2:
            # Rotation turns pairs of dimensions; an odd count leaves one without a partner.
            raise CheckpointError(f"{source}: the rotary dimensions per head ({rot}) must be even (head dimension "
                                  f"{self.head_dim} x partial_rotary_factor {self.partial_rotary_factor})")
        n = self.num_parameters()
        dtype = self.torch_dtype if self.torch_dtype in DTYPE_BYTES else "float32"
        size = n * DTYPE_BYTES[dtype]
        layers = self.num_hidden_layers
        if layers > MAX_LAYERS or size > MAX_WEIGHT_BYTES:
            what = (f"{spelled.get('num_hidden_layers', 'num_hidden_layers')} is {layers:,}, which"
                    if layers > MAX_LAYERS else "the config")
            raise CheckpointError(
                f"{source}: {what} implies {n:.3g} parameters ({_bytes(size)} in {dtype}); kaki refuses configs "
                f"of more than {MAX_LAYERS:,} layers or {_bytes(MAX_WEIGHT_BYTES)} of weights, far past any "
                "published model: the file is damaged or not a model's config, restore it from the original "
                "checkpoint")

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

# Past these a config is damaged or hostile: the deepest published transformers have under 130
# layers and the largest ~2 TB of weights. Checked before building anything, since every layer is
# a module (about 1 ms each, even on the meta device: a million layers took over 15 minutes).
# Not the machine's memory: safetensors stay mmapped, so a model larger than RAM still loads
# (slowly), and quantizing while loading needs less than the stored size.
MAX_LAYERS = 1024
MAX_WEIGHT_BYTES = 2 * 10**12
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CONFIG_FILE_LIMIT = 16 * 2**20  # real config.json files are a few KB (id2label maps: under 1 MB)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true is no size


def _is_number(v: Any) -> bool:
    return (isinstance(v, int) or isinstance(v, float)) and not isinstance(v, bool) and math.isfinite(v)


# What a value must be, as (test, description for the message).
KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "size": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "positive": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "fraction": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "non-negative": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "string": (lambda v: isinstance(v, str), "a string"),
    "token id": (lambda v: v is None or _is_int(v), "an integer token id"),
    "token ids": (lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
                  "an integer or a list of integers"),
    "dtype": (lambda v: v is None or isinstance(v, str), "a dtype name such as \"bfloat16\""),
    "object": (lambda v: v is None or isinstance(v, dict), "an object"),
}
FIELD_KINDS: dict[str, str] = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "rotary_dim"), "size"),
    "layer_norm_eps": "positive", "rope_theta": "positive", "partial_rotary_factor": "fraction",
    "initializer_range": "non-negative", "hidden_act": "string", "rope_scaling": "object",
    **dict.fromkeys(("rms_norm", "qk_layernorm", "use_parallel_residual", "attention_bias", "mlp_bias",
                     "gated_mlp", "fused_qkv", "tie_word_embeddings", "shared_layernorm", "rotary_interleaved",
                     "lm_head_bias"), "bool"),
    "bos_token_id": "token id", "pad_token_id": "token id", "eos_token_id": "token ids", "torch_dtype": "dtype",
}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# rope_scaling's numbers, per kind: what kaki.model._scale_rope reads.
ROPE_SCALING_KEYS = {"linear": {"factor": "positive"},
                     "llama3": {"factor": "positive", "low_freq_factor": "positive", "high_freq_factor": "positive",
                                "original_max_position_embeddings": "size"}}


def check_value(name: str, value: Any, source: str, spelled: str | None = None) -> None:
    """A CheckpointError unless `value` is what field `name` must be; `spelled` is the key as the
    source names it (GPT-J's n_embd, Megatron's num_layers)."""
    test, description = KINDS[FIELD_KINDS[name]]
    if not test(value):
        raise CheckpointError(f"{source}: {spelled or name} must be {description}, not {_show(value)}; "
                              "fix it or restore the file from the original checkpoint")


def _rope_scaling(scaling: Any, source: str, spelled: str) -> dict:
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{source}: {spelled} must be an object, not {_show(scaling)}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if not isinstance(kind, str) or kind not in ROPE_SCALINGS:
        raise CheckpointError(f"rope scaling {_show(kind)} is not supported; kaki implements "
                              f"{', '.join(ROPE_SCALINGS)}")
    for key, kind_of in ROPE_SCALING_KEYS[kind].items():
        test, description = KINDS[kind_of]
        if not test(scaling.get(key)):
            raise CheckpointError(f"{source}: {spelled}.{key} must be {description}, not "
                                  f"{_show(scaling.get(key))} (rope_type {kind})")
    if kind == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise CheckpointError(f"{source}: {spelled}.high_freq_factor must be greater than low_freq_factor "
                              f"({scaling['high_freq_factor']} <= {scaling['low_freq_factor']})")
    return {**scaling, "rope_type": kind}


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{text} ({_json_type(value)})" if isinstance(value, str) else text


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.3g} PB"

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
    return ModelConfig.from_dict(read_json(path, "restore it from the original checkpoint"), str(path))


def read_json(path: Path, fix: str, limit: int = CONFIG_FILE_LIMIT) -> Any:
    """A model directory's JSON file (config.json, a shard index), or a CheckpointError ending
    with `fix`. Read whole, so its size is checked first."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise CheckpointError(f"{path} is {_bytes(size)}, more than the {_bytes(limit)} kaki reads from "
                                  f"such a file; {fix}")
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise CheckpointError(f"{path} is not valid JSON ({why}); {fix}") from None
