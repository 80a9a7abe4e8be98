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
    return {
        "path": str(d), "family": cfg.model_type, "parameters": n,
        "bytes": {"float32": n * 4, "bfloat16": n * 2, "float16": n * 2},
        "stored_dtype": cfg.torch_dtype, "context_length": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size, "tokenizer": tok_kind, "tokenizer_vocab": tok_vocab,
        "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
        "attention_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
        "rotary_dims": cfg.rotary_ndims, "rope_theta": cfg.rope_theta,
        "kv_cache_bytes_per_token_fp32": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4,
        **extra,
    }


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
    print(f"  weights         " + ", ".join(f"{k} {_gb(v)}" for k, v in info["bytes"].items())
          + f" (stored as {info['stored_dtype']})")
    print(f"  context         {info['context_length']:,} tokens (rotary dims {info['rotary_dims']}, "
          f"theta {info['rope_theta']:g})")
    print(f"  vocabulary      {info['vocab_size']:,} ({info['tokenizer']}, {info['tokenizer_vocab']:,} pieces)")
    print(f"  KV cache        {_gb(info['kv_cache_bytes_per_token_fp32'] * 1000)} per 1k tokens in fp32")
    if info.get("layout") == "megatron-release":
        print(f"  iteration       {info['iteration']} (Adept/Megatron release layout)")
    return 0
