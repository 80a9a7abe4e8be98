"""`kaki merge-lora`: fold a LoRA adapter into its base model and write a plain model directory."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base model",
                       description="Write BASE + ADAPTER as a plain float model directory (transformers "
                                   "layout) that every kaki command and from_pretrained load. An adapter "
                                   "trained on a quantized base (--quantize) merges into the base's "
                                   "original float weights (its base_model_name_or_path); a base stored "
                                   "quantized merges into its dequantized weights, and says so.")
    p.add_argument("adapter", metavar="ADAPTER", nargs="?", default=None,
                   help="adapter directory (from `kaki train --lora`); `--adapter ADAPTER` works too, as "
                        "every other command spells it")
    p.add_argument("--adapter", dest="adapter_flag", metavar="ADAPTER", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", "-m", default=None,
                   help="base model directory (default: the adapter's base_model_name_or_path)")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory (written atomically)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default bfloat16)")
    p.set_defaults(func=run)


def run(args) -> int:
    from kaki.errors import KakiError
    from kaki.lora import merge_adapter_dir, read_adapter_config

    if args.adapter and args.adapter_flag and args.adapter != args.adapter_flag:
        raise KakiError(f"two adapters given ({args.adapter} and --adapter {args.adapter_flag}); give one")
    args.adapter = args.adapter or args.adapter_flag
    if not args.adapter:
        raise KakiError("give the adapter directory: kaki merge-lora ADAPTER --out DIR (or --adapter ADAPTER)")
    base = args.model or read_adapter_config(args.adapter).get("base_model_name_or_path")
    if not base:
        raise KakiError(f"{args.adapter} does not name its base model; pass --model BASE")
    print(merge_adapter_dir(args.adapter, base, args.out, args.dtype))
    return 0
