"""`kaki info`: this machine's CPU and the kernels kaki picks on it, and what a model directory holds."""

from __future__ import annotations

import json
import os


def register(sub) -> None:
    p = sub.add_parser("info", help="show the CPU's kernels and a model's family, size and context",
                       description="Print the CPU's capability and the int8 and small-M kernels kaki uses on "
                                   "it, then a model directory's family, parameter count, bytes per dtype, "
                                   "context length and vocabulary, without loading weights.")
    p.add_argument("model", metavar="DIR", nargs="?", default=None,
                   help="model directory or cached hub id (default: $KAKI_MODEL, else the bundled kaki-tiny; "
                        "without either, the machine only)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def int8_kernel() -> tuple[str, str]:
    """(kernel int8 layers use on this CPU, why): kaki's native build by name, or the fallback."""
    from kaki import native
    from kaki.quant import int8

    kernel = int8.cpu_kernel()
    if kernel == "native":
        return f"native {native.variant()}", "the best build this CPU runs"
    if os.environ.get("KAKI_INT8_KERNEL"):
        return kernel, "KAKI_INT8_KERNEL"
    if os.environ.get("KAKI_NO_NATIVE", "") not in ("", "0"):
        return kernel, "KAKI_NO_NATIVE is set"
    lacking = native.missing("avx2")
    if lacking:
        return kernel, f"kaki's kernel needs {', '.join(lacking)}"
    if native._compiler() is None:
        return kernel, "no C compiler (set CC) for kaki's kernel"
    return kernel, "kaki's kernel did not build (its log line says why)"


def machine(strict: bool = True) -> dict:
    """The CPU and what kaki runs on it: the facts `kaki info`, the test header and the benchmarks
    print. A bad KAKI_* setting raises its KakiError, or with strict=False is reported in place
    (the test header must not stop a run that sets one on purpose)."""
    import torch

    from kaki import cpu, kernels, small_m
    from kaki.errors import KakiError

    try:
        kernel, why = int8_kernel()
    except KakiError as e:
        if strict:
            raise
        kernel, why = "none", str(e)
    try:
        forced = small_m.forced()
    except KakiError as e:
        if strict:
            raise
        forced = f"invalid ({e})"
    return {
        "cpu": cpu.model_name(), "capability": cpu.capability(), "flags": cpu.relevant_flags(),
        "threads": torch.get_num_threads(), "int8_kernel": kernel, "int8_kernel_why": why,
        "small_m": forced or "auto", "small_m_cache": str(small_m.cache_file()),
        "native_bf16": kernels.cpu_has_fast_bf16(),
    }


def machine_line(m: dict | None = None) -> str:
    """One line: what a CI log should show about the machine a test or benchmark ran on."""
    m = m or machine(strict=False)
    have = " ".join(f for f, on in m["flags"].items() if on) or "none of " + ", ".join(m["flags"])
    return (f"cpu: {m['cpu']}, torch {m['capability']}, {m['threads']} threads, flags {have}; "
            f"int8 kernel {m['int8_kernel']} ({m['int8_kernel_why']}); small-M {m['small_m']}; "
            f"bf16 {'native' if m['native_bf16'] else 'emulated'}")


def small_m_choices(cfg) -> dict:
    """What the small-M cache holds for `cfg`'s layer shapes at the dtype --dtype auto picks on
    this CPU and torch's thread count: {"dtype", "threads", "shapes": {"NxK": {rows: path} | None}}."""
    import torch

    from kaki import kernels, small_m
    from kaki.device import pick_dtype
    from kaki.model import CausalLM

    with torch.device("meta"):
        layers = [m for m in CausalLM(cfg).modules() if isinstance(m, kernels.Linear)]
    dtype, threads = pick_dtype("auto", cfg, torch.device("cpu")), torch.get_num_threads()
    cached = small_m.read_cache()
    counts = {(n, k, dtype): len(ms) for (n, k, _), ms in small_m.groups(layers).items()}
    one_core = small_m.one_core_buckets(counts, threads, small_m.forced())
    shapes = {}
    for n, k, _ in counts:
        entry = cached.get(small_m.cache_key((n, k), dtype, threads, one_core))
        shapes[f"{n}x{k}"] = entry["paths"] if entry else None
    return {"dtype": str(dtype).removeprefix("torch."), "threads": threads, "shapes": shapes}


def describe(model: str) -> dict:
    from kaki import adept
    from kaki.config import read_config
    from kaki.errors import KakiError
    from kaki.loading import resolve_model_path
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


def print_machine(m: dict) -> None:
    have = [f for f, on in m["flags"].items() if on]
    lacks = [f for f, on in m["flags"].items() if not on]
    print("machine")
    print(f"  cpu             {m['cpu']} (torch dispatch {m['capability']}, {m['threads']} threads)")
    print(f"  cpu flags       {' '.join(have) or '-'}" + (f" (lacks {' '.join(lacks)})" if lacks else ""))
    print(f"  int8 kernel     {m['int8_kernel']} ({m['int8_kernel_why']})")
    how = ("forced by KAKI_SMALL_M" if m["small_m"] != "auto"
           else f"timed per layer shape at a model's first use, cached in {m['small_m_cache']}")
    print(f"  small-M         {m['small_m']} ({how})")
    print("  bf16            " + ("native" if m["native_bf16"] else
                                  "no native bf16: --dtype auto picks float32 where it fits"))


def print_small_m(choices: dict) -> None:
    label = f"  small-M         ({choices['dtype']}, {choices['threads']} threads) "
    if not choices["shapes"]:
        print(label + "F.linear: no layer large enough to time")
    for shape, paths in choices["shapes"].items():
        print(label + (f"{shape} at {'/'.join(paths)} rows: {'/'.join(paths.values())}" if paths
                       else f"{shape}: not timed yet on this machine (at first use)"))
        label = " " * len(label)


def run(args) -> int:
    from kaki.cli.common import default_model

    model = args.model or default_model()
    info = describe(model) if model else None  # a bad DIR is the one error line, before any kernel log
    if info:
        from kaki.config import read_config
        from kaki.loading import resolve_model_path
        # A release or a checkpoint stored quantized has no float layers to plan as config.json says.
        plain = info.get("layout") != "megatron-release" and not info["quantization"]
        info["small_m"] = small_m_choices(read_config(resolve_model_path(model))) if plain else None
    m = machine()
    if args.json:
        print(json.dumps({"machine": m, **(info or {})}, indent=2))
        return 0
    print_machine(m)
    if info is None:
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
    if info["small_m"]:
        print_small_m(info["small_m"])
    return 0
