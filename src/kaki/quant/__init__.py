"""Quantized weights: int8 (per output channel) and int4 (group-wise) linear layers, quantized
tensor by tensor while a checkpoint loads, saved and reloaded as they are.

    llm = kaki.load("models/kaki-tiny", quantize="int8")   # or "int4", "int4:128"
    llm.save("kaki-tiny-int8")                               # safetensors + quantization_config

The layers are module swaps (kaki.quant.load.swap): the model file knows nothing of them.
docs/quantization.md has the formats, the kernels chosen per device and the measurements.
"""

from __future__ import annotations

from kaki.checkpoint import renamer
from kaki.quant.load import QuantLinear, linear_shapes
from kaki.quant.load import quantize_model as _quantize_model
from kaki.quant.spec import DEFAULT_INT4_GROUP, FORMATS, INT4_GROUP_SIZES, QuantSpec, as_spec

__all__ = ["QuantSpec", "as_spec", "FORMATS", "INT4_GROUP_SIZES", "DEFAULT_INT4_GROUP", "exact_keys",
           "quantize_model", "is_quantized", "weight_bytes"]


def quantize_model(model, spec):
    """Quantize an already loaded CausalLM in place; `spec` as kaki.load's `quantize`."""
    return _quantize_model(model, as_spec(spec))


def is_quantized(model) -> bool:
    return "quantization_config" in model.config.extra


def exact_keys(model) -> set[str]:
    """Checkpoint keys that a save must write in their own dtype (quantization scales and zeros)."""
    rename = renamer(model.config.model_type, to_checkpoint=True)
    keys = set()
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            keys |= {rename(f"{name}.{k}") for k in ("weight_scale", "weight_zero")}
    return keys


def weight_bytes(cfg, spec: QuantSpec | None, float_bytes: int = 2) -> int:
    """Bytes of a model's weights held in `spec`'s format (None: all floats of `float_bytes`);
    the input embedding, norms and biases stay floats."""
    total = cfg.num_parameters() * float_bytes
    if spec is None:
        return total
    for name, (n, k) in linear_shapes(cfg).items():
        if name == "lm_head" and not spec.head:
            continue
        if spec.format == "int4" and k % spec.group_size:
            continue
        if not (name == "lm_head" and cfg.tie_word_embeddings):
            total -= n * k * float_bytes  # a tied head's floats are the embedding's, which stays
        if spec.format == "int8":
            total += n * k + 4 * n
        else:
            total += n * k // 2 + 2 * 2 * n * (k // spec.group_size)
    return total
