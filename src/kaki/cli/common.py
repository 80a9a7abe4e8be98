"""Flags every model-loading command shares, and turning them into a loaded LLM."""

from __future__ import annotations

import argparse
import os

from kaki.errors import KakiError


def default_model() -> str | None:
    """--model's default: $KAKI_MODEL, else the bundled demo model when it is there."""
    from kaki.paths import bundled_model
    env = os.environ.get("KAKI_MODEL")
    if env:
        return env
    path = bundled_model()
    return str(path) if path is not None else None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="model directory or a hub id already in the local HF cache "
                        "(default: $KAKI_MODEL, else the bundled kaki-tiny)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype in memory (auto: fastest that fits on this device)")
    p.add_argument("--device", default="auto", help="cpu, cuda[:N] or auto")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="apply a LoRA adapter directory (from `kaki train --lora`) without merging")
    add_quantize_args(p)


def add_tensor_parallel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="split the model over N processes (heads, MLP units, vocabulary): start them with "
                        "`torchrun --nproc-per-node N -m kaki ...`; rank 0 reads input and prints, the others "
                        "follow its steps")


def start_ranks(llm) -> bool:
    """After loading: True on the process that does the command's work (rank 0, or the only one);
    the other ranks of a tensor-parallel job run rank 0's steps here, then get False."""
    from kaki.engine import mirror
    return mirror.start(llm)


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", default=None, metavar="FORMAT",
                   help="quantize the linear layers while loading: int8 (per channel) or int4 (group-wise; "
                        "int4:GROUP for a group size of 32, 64, 128 or 256, default 64). A checkpoint saved "
                        "quantized loads as stored without this flag")
    p.add_argument("--no-quantize-head", dest="quantize_head", action="store_false",
                   help="with --quantize, keep the lm_head in floating point")


def load_from_args(args: argparse.Namespace):
    import kaki
    from kaki import distributed
    model = args.model or default_model()
    if model is None:
        raise KakiError("no --model given and no bundled model found; pass --model DIR")
    tensor_parallel = getattr(args, "tensor_parallel", None) or 1
    if hasattr(args, "tensor_parallel"):  # generate, chat and serve: one process per rank
        distributed.check_world(tensor_parallel, args.command)
    llm = kaki.load(model, dtype=args.dtype, device=args.device, quantize=getattr(args, "quantize", None),
                    quantize_head=getattr(args, "quantize_head", True), tensor_parallel=tensor_parallel)
    if getattr(args, "adapter", None):
        # Float and quantized models alike: over an int8/int4 layer the adapter runs beside it.
        from kaki.lora import apply_adapter
        apply_adapter(llm, args.adapter)
    return llm


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int | None = None) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", "-n", type=int, default=max_new_tokens,
                   help="tokens to generate at most (default: the model's generation_config, else 128)")
    g.add_argument("--temperature", "-t", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="0 = off")
    g.add_argument("--top-p", type=float, default=None, help="in (0, 1]; 1 = off")
    g.add_argument("--repetition-penalty", type=float, default=None, help="1 = off")
    g.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when TEXT appears (repeatable); TEXT is not printed")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    keys = ["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop"]
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def add_moderation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("moderation")
    g.add_argument("--moderation", metavar="DIR", default=None,
                   help="screen every user message and every reply with a moderation model: a sequence "
                        "classifier, or a causal LM prompted in GPT-JT-Moderation's few-shot format")
    g.add_argument("--moderation-block", metavar="LABEL,...", default=None,
                   help="labels that block (default for the few-shot format: 'needs caution,needs "
                        "intervention'; for a classifier: every label not named like casual/safe/ok/neutral)")
    g.add_argument("--moderation-threshold", type=float, default=None, metavar="P",
                   help="block when the blocking labels' probability reaches P (default: when one of them "
                        "is the most likely label; 0.5 per label for a multi-label classifier)")


def moderator_from_args(args: argparse.Namespace):
    """The Moderator for --moderation (None without it), on the chat model's device and dtype."""
    if not args.moderation:
        for flag in ("moderation_block", "moderation_threshold"):
            if getattr(args, flag) is not None:
                raise KakiError(f"--{flag.replace('_', '-')} needs --moderation DIR")
        return None
    from kaki.moderation import load_moderator
    return load_moderator(args.moderation, block=args.moderation_block, threshold=args.moderation_threshold,
                          dtype=args.dtype, device=args.device)
