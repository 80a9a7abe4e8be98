"""`kaki convert SRC DST --quantize int8|int4`: a quantized transformers directory.

The source is read and quantized tensor by tensor (as `kaki.load(..., quantize=)` does), the codes
are kept in their plain layout (no kernel packing) and written as they are, so the peak memory
is about the quantized model's size, and loading DST gives back exactly these codes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kaki.adept.release import is_release_dir
from kaki.checkpoint import DTYPES
from kaki.config import read_config
from kaki.errors import KakiError
from kaki.loading import load_model, resolve_model_path
from kaki.quant.spec import QuantSpec
from kaki.saving import save_model_dir


def write_quantized(src: str | os.PathLike, dst: str | os.PathLike, spec: QuantSpec, dtype: str | None = None,
                    progress: bool = False) -> Path:
    """Quantize the transformers directory `src` into `dst` (replaced atomically). Floats that stay
    floats (embedding, norms, biases) are written in `dtype`, default as stored in `src`."""
    src_dir = resolve_model_path(src)
    if is_release_dir(src_dir):
        raise KakiError(f"{src_dir} is an Adept release; convert it to transformers first "
                        "(kaki convert SRC TMP --to hf), then quantize TMP")
    cfg = read_config(src_dir)
    if "quantization_config" in cfg.extra:
        raise KakiError(f"{src_dir} is already quantized; quantize the original unquantized checkpoint")
    stored = DTYPES.get(str(cfg.torch_dtype).replace("torch.", ""), torch.float32)
    dt = DTYPES[dtype] if dtype else stored
    model = load_model(src_dir, cfg, dt, torch.device("cpu"), progress, quantize=spec, keep_plain=True)
    return save_model_dir(model, dst, tokenizer_dir=src_dir)
