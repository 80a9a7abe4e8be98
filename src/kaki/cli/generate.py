"""`kaki generate`: complete prompts from the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys

from kaki.cli.speculate import add_speculate_args, apply_speculate, decode_summary
from kaki.cli.common import (add_model_args, add_sampling_args, add_tensor_parallel_arg, load_from_args, sampling_kwargs,
                             start_ranks)


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete one or more prompts",
                       description="Complete PROMPT(s) with a model. Several prompts run as one batch.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT",
                   help="prompt text, where \\n, \\t and \\\\ stand for a newline, a tab and a backslash "
                        "(a shell passes them on as two characters; --raw keeps them); '-' or none reads stdin "
                        "as is")
    add_model_args(p)
    add_tensor_parallel_arg(p)
    add_sampling_args(p)
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--no-bos", dest="add_bos", action="store_false", default=None,
                   help="do not prepend BOS even if the tokenizer config says so")
    p.add_argument("--raw", action="store_true", help="take PROMPT arguments literally (no \\n escapes)")
    p.add_argument("--no-prompt", dest="echo", action="store_false",
                   help="print only the generated text (default: each prompt followed by its completion)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    add_speculate_args(p)
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print what decoding did to stderr (tokens per target pass, drafts accepted)")
    p.set_defaults(func=run)


# Escapes a user types in a shell argument for the characters a chat prompt needs ("human: hi\n\nadept:").
ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
SEPARATOR = "\n---\n"  # between the results of several prompts


def unescape(text: str) -> str:
    """\\n, \\t and \\\\ become a newline, a tab and one backslash; any other backslash stays as is
    (so a Windows path or a regex keeps its backslashes)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPES:
            out.append(ESCAPES[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def run(args) -> int:
    from kaki.errors import KakiError

    prompts = args.prompts or ["-"]
    # The other ranks of a torchrun job leave stdin to rank 0, which tells them what to run.
    stdin = sys.stdin.read() if "-" in prompts and os.environ.get("RANK", "0") == "0" else ""
    prompts = [stdin if p == "-" else p if args.raw else unescape(p) for p in prompts]
    if args.stream and len(prompts) != 1:
        raise KakiError("--stream takes exactly one prompt")
    llm = load_from_args(args)
    apply_speculate(llm, args)  # before the ranks part: a refused draft model stops every rank
    if not start_ranks(llm):
        return 0  # another rank of a tensor-parallel job: rank 0 prints
    kw = sampling_kwargs(args)
    # One form for every mode: the prompt (unless --no-prompt), then its completion, one newline;
    # several prompts' results are separated by a line of three dashes.
    if args.stream:
        if args.echo:
            sys.stdout.write(prompts[0])
        for piece in llm.stream(prompts[0], add_bos=args.add_bos, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        if args.verbose:
            print(f"kaki generate: {decode_summary(llm.last_stats)}", file=sys.stderr)
        return 0
    results = llm.generate(prompts, add_bos=args.add_bos, **kw)
    if args.verbose:
        print(f"kaki generate: {decode_summary(llm.last_stats)}", file=sys.stderr)
    if args.json:
        for c in results:
            print(json.dumps({"prompt": c.prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason}, ensure_ascii=False))
        return 0
    print(SEPARATOR.join((c.prompt if args.echo else "") + c.text for c in results))
    return 0
