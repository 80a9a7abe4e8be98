"""Speculative decoding flags shared by `kaki generate`, `kaki chat` and `kaki serve`:
`--speculate ngram[:K]|off` (`--speculative` is its earlier name) or `--draft-model DIR
[--draft-k K]`, and the one-line summary `--verbose` and chat's /stats print. (kaki.sampling is
imported in the functions: `kaki --help` does not import torch.)"""

from __future__ import annotations

import argparse

from kaki.errors import KakiError, ParamError

MAX_DRAFT_K = 16  # kaki.sampling.MAX_DRAFT, checked equal by the tests


def speculate_arg(value: str) -> str:
    """--speculate's type: 'off', 'ngram' or 'ngram:K', checked before the model loads ('draft[:K]'
    comes with --draft-model)."""
    from kaki.sampling import parse_speculate
    try:
        kind, _ = parse_speculate(value, "--speculate")
    except ParamError as e:
        raise argparse.ArgumentTypeError(e.message) from None
    if kind == "draft":
        raise argparse.ArgumentTypeError("drafts from a model come with --draft-model DIR [--draft-k K]")
    return value


def draft_k_arg(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_DRAFT_K:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_DRAFT_K}, got {value!r}")
    return int(value)


def add_speculate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", "--speculative", dest="speculate", type=speculate_arg, default=None,
                   metavar="ngram[:K]|off",
                   help="prompt-lookup speculative decoding: draft up to K tokens (default 4) that followed "
                        "an earlier match of the last few tokens, verify them in one pass; greedy output is "
                        "unchanged, copying replies come faster (default: off)")
    p.add_argument("--draft-model", metavar="DIR", default=None,
                   help="speculate with a smaller model that uses the same tokenizer: it drafts up to "
                        "--draft-k tokens, the model verifies them in one pass (greedy output unchanged)")
    p.add_argument("--draft-k", type=draft_k_arg, default=None, metavar="K",
                   help="tokens the draft model proposes per step at most (default 4)")


def apply_speculate(llm, args: argparse.Namespace) -> None:
    """Set the loaded model's speculation from the flags (the draft model loads here, on every rank
    of a tensor-parallel job: each drafts with its own whole copy)."""
    if args.draft_k is not None and args.draft_model is None:
        raise KakiError("--draft-k needs --draft-model DIR")
    if args.draft_model is not None:
        if args.speculate not in (None, "off"):
            raise KakiError(f"--speculate {args.speculate} and --draft-model: give one of them")
        llm.set_draft(args.draft_model, args.draft_k)
    elif args.speculate is not None:
        llm.speculate = args.speculate


def decode_summary(stats: dict) -> str:
    """kaki.engine.speculative.summary (imported here: the CLI starts without torch)."""
    from kaki.engine.speculative import summary
    return summary(stats)
