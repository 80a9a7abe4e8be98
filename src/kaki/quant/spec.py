"""What a quantized model holds: the format, its group size, which modules, and the
`quantization_config` block of config.json that says so exactly."""

from __future__ import annotations

from dataclasses import dataclass

from kaki.errors import CheckpointError, KakiError

FORMATS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels (CPU and CUDA tinygemm) accept
# Group 64: on kaki-tiny's eval set 32 and 64 raise perplexity equally (+0.44%), 128 more (+0.77%);
# 64 spends half of 32's bits on scales and zeros (0.5 instead of 1 per weight), and the CPU kernel
# runs 64 ~10% faster than 32 (docs/quantization.md has the numbers).
DEFAULT_INT4_GROUP = 64
QUANT_METHOD = "kaki"

_DESCRIPTIONS = {
    "int8": {
        "scheme": "symmetric, one scale per output channel (row); zero point 0",
        "weight": "<module>.weight: int8 [out_features, in_features], values in [-127, 127]",
        "scale": "<module>.weight_scale: float32 [out_features]",
        "dequantize": "w[o, i] = weight[o, i] * weight_scale[o]",
    },
    "int4": {
        "scheme": "asymmetric, one scale and zero per group of group_size consecutive inputs of a row",
        "weight": "<module>.weight: uint8 [out_features, in_features / 2], two 4-bit values q in [0, 15] "
                  "per byte, the even input index in the high nibble",
        "scale": "<module>.weight_scale: bfloat16 [out_features, in_features / group_size]",
        "zero": "<module>.weight_zero: bfloat16 [out_features, in_features / group_size]",
        "dequantize": "w[o, i] = (q[o, i] - 8) * weight_scale[o, i // group_size] "
                      "+ weight_zero[o, i // group_size]",
    },
}


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: `format` int8 or int4, int4's `group_size`, and whether the lm_head is
    quantized too (`head`; the input embedding never is: it is gathered, not multiplied)."""

    format: str
    group_size: int | None = None
    head: bool = True

    def __post_init__(self):
        if self.format not in FORMATS:
            raise KakiError(f"quantization format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.format == "int8" and self.group_size is not None:
            raise KakiError("int8 has one scale per output channel; a group size applies to int4 only")
        if self.format == "int4":
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_INT4_GROUP)
            elif self.group_size not in INT4_GROUP_SIZES:
                raise KakiError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, "
                                f"not {self.group_size}")

    @property
    def bits(self) -> int:
        return 8 if self.format == "int8" else 4

    def config_block(self, modules: list[str]) -> dict:
        """The `quantization_config` of config.json for a checkpoint whose `modules` (checkpoint
        names) are stored in this format; everything else is stored as plain floats."""
        block = {"quant_method": QUANT_METHOD, "format": self.format, "bits": self.bits,
                 "group_size": self.group_size, "lm_head": self.head, **_DESCRIPTIONS[self.format],
                 "not_quantized": "the input embedding, norms and biases (plain floating point)",
                 "modules": list(modules)}
        return block

    @classmethod
    def from_config_block(cls, block: dict, where: str) -> tuple["QuantSpec", list[str]]:
        """The spec and module names a stored `quantization_config` describes."""
        if not isinstance(block, dict) or block.get("quant_method") != QUANT_METHOD:
            method = block.get("quant_method") if isinstance(block, dict) else block
            raise CheckpointError(f"{where} is quantized with {method!r}, which kaki cannot read; kaki loads "
                                  f"its own int8/int4 checkpoints (quant_method {QUANT_METHOD!r}) or "
                                  "unquantized ones (pass --quantize to quantize while loading)")
        modules = block.get("modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise CheckpointError(f"{where}: quantization_config.modules must list the quantized modules")
        try:
            spec = cls(block.get("format"), block.get("group_size"), bool(block.get("lm_head", True)))
        except KakiError as e:
            raise CheckpointError(f"{where}: quantization_config is not valid ({e})") from None
        return spec, modules


def as_spec(quantize: "str | QuantSpec | None", head: bool = True) -> QuantSpec | None:
    """`quantize` as given to kaki.load / --quantize: None, "int8", "int4", "int4:128" or a spec."""
    if quantize is None or isinstance(quantize, QuantSpec):
        return quantize
    fmt, _, group = str(quantize).partition(":")
    if group and not group.isdigit():
        raise KakiError(f"--quantize takes int8, int4 or int4:GROUP (GROUP one of "
                        f"{', '.join(map(str, INT4_GROUP_SIZES))}), not {quantize!r}")
    return QuantSpec(fmt, int(group) if group else None, head)
