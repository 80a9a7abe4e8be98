"""`kaki merge-lora`: fold a LoRA adapter into its base model and write a plain model directory."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("merge-lora", help="merge a LoRA adapter into its base model",
                       description="Write BASE + ADAPTER as a plain model directory (transformers "
                                   "layout) that every kaki command and from_pretrained load.")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter directory (from `kaki train --lora`)")
    p.add_argument("--model", "-m", default=None,
                   help="base model directory (default: the adapter's base_model_name_or_path)")
    p.add_argument("--out", required=True, metavar="DIR", help="output model directory (written atomically)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default: the base checkpoint's)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from kaki.config import read_config
    from kaki.errors import KakiError
    from kaki.llm import load_model, resolve_model_path, save_model_dir
    from kaki.train.lora import apply_adapter_to_model, merge_lora, read_adapter_config

    base = args.model or read_adapter_config(args.adapter).get("base_model_name_or_path")
    if not base:
        raise KakiError(f"{args.adapter} does not name its base model; pass --model BASE")
    base_dir = resolve_model_path(base)
    cfg = read_config(base_dir)
    # Merged in fp32 and rounded once on save, whatever the checkpoint's dtype.
    model = load_model(base_dir, cfg, torch.float32, torch.device("cpu"))
    apply_adapter_to_model(model, args.adapter)
    merge_lora(model)
    dtype = args.dtype or (str(cfg.torch_dtype).replace("torch.", "") if cfg.torch_dtype else None)
    out = save_model_dir(model, args.out, tokenizer_dir=base_dir, dtype=dtype)
    print(f"wrote {out}")
    return 0
