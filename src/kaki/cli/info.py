"""`kaki info`: what a model directory holds."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show a model's family, size and context",
                       description="Print a model directory's family, parameter count, bytes per "
                                   "dtype, context length and vocabulary, without loading weights.")
    p.add_argument("model", metavar="DIR", help="model directory or cached hub id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def describe(model: str) -> dict:
    from kaki import adept
    from kaki.config import read_config
    from kaki.errors import KakiError
    from kaki.llm import resolve_model_path
    from kaki.tokenizer import Tokenizer

    d = resolve_model_path(model)
    release = adept.read_release(d) if adept.is_release_dir(d) else None
    cfg = release.cfg if release else read_config(d)
    n = cfg.num_parameters()
    try:
        tok = release.tokenizer() if release else Tokenizer.from_dir(d, cfg)
        tok_kind, tok_vocab = tok.kind, tok.vocab_size
    except KakiError:
        tok_kind, tok_vocab = "none", 0
    extra = {"layout": "megatron-release", "iteration": release.iteration} if release else {}
    quant = _quantized_sizes(cfg)
    return {
        "path": str(d), "family": cfg.model_type, "parameters": n,
        "bytes": {"float32": n * 4, "bfloat16": n * 2, "float16": n * 2, **quant["bytes"]},
        "memory": quant["memory"], "quantization": quant["stored"],
        "stored_dtype": cfg.torch_dtype, "context_length": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size, "tokenizer": tok_kind, "tokenizer_vocab": tok_vocab,
        "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
        "rotary_dims": cfg.rotary_ndims, "rope_theta": cfg.rope_theta,
        "kv_cache_bytes_per_token_fp32": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4,
        **extra,
    }


def _quantized_sizes(cfg) -> dict:
    """Weight bytes in int8/int4 (embedding, norms and biases in bf16), and the memory to run one
    full-context sequence in each format: weights plus its KV cache (fp32 for float32, else bf16)."""
    from kaki.quant import QuantSpec, weight_bytes

    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    sizes = {"int8": weight_bytes(cfg, QuantSpec("int8")), "int4": weight_bytes(cfg, QuantSpec("int4"))}
    memory = {"float32": weight_bytes(cfg, None, 4) + kv_token * 4 * cfg.max_position_embeddings}
    for name, size in [("bfloat16", weight_bytes(cfg, None, 2)), *sizes.items()]:
        memory[name] = size + kv_token * 2 * cfg.max_position_embeddings
    block = cfg.extra.get("quantization_config")
    stored = None
    if isinstance(block, dict):
        stored = block.get("format", "?") + (f" (group {block['group_size']})" if block.get("group_size") else "")
    return {"bytes": sizes, "memory": memory, "stored": stored}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def run(args) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{info['path']}")
    print(f"  family          {info['family']} ({info['layers']} layers, hidden {info['hidden_size']}, "
          f"{info['attention_heads']} heads / {info['kv_heads']} kv heads)")
    print(f"  parameters      {info['parameters']:,}")
    floats = {k: v for k, v in info["bytes"].items() if k not in ("int8", "int4")}
    stored = f"{info['quantization']}, other weights {info['stored_dtype']}" if info["quantization"] \
        else info["stored_dtype"]
    print(f"  weights         " + ", ".join(f"{k} {_gb(v)}" for k, v in floats.items()) + f" (stored as {stored})")
    print(f"  quantized       int8 {_gb(info['bytes']['int8'])}, int4 {_gb(info['bytes']['int4'])} "
          "(linear layers and lm_head; embedding, norms and biases in bfloat16)")
    print(f"  memory to run   " + ", ".join(f"{k} {_gb(v)}" for k, v in info["memory"].items())
          + f" (weights + KV cache of one {info['context_length']:,}-token sequence)")
    print(f"  context         {info['context_length']:,} tokens (rotary dims {info['rotary_dims']}, "
          f"theta {info['rope_theta']:g})")
    print(f"  vocabulary      {info['vocab_size']:,} ({info['tokenizer']}, {info['tokenizer_vocab']:,} pieces)")
    print(f"  KV cache        {_gb(info['kv_cache_bytes_per_token_fp32'] * 1000)} per 1k tokens in fp32")
    if info.get("layout") == "megatron-release":
        print(f"  iteration       {info['iteration']} (Adept/Megatron release layout)")
    return 0
