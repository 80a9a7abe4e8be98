"""`kaki generate`: complete prompts from the command line."""

from __future__ import annotations

import json
import sys

from kaki.cli.common import add_model_args, add_sampling_args, load_from_args, sampling_kwargs


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete one or more prompts",
                       description="Complete PROMPT(s) with a model. Several prompts run as one batch.")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text; '-' or none reads stdin")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--no-bos", dest="add_bos", action="store_false", default=None,
                   help="do not prepend BOS even if the tokenizer config says so")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=run)


def run(args) -> int:
    from kaki.errors import KakiError

    prompts = args.prompts or ["-"]
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    if args.stream and len(prompts) != 1:
        raise KakiError("--stream takes exactly one prompt")
    llm = load_from_args(args)
    kw = sampling_kwargs(args)
    if args.stream:
        for piece in llm.stream(prompts[0], add_bos=args.add_bos, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for c in llm.generate(prompts, add_bos=args.add_bos, **kw):
        if args.json:
            print(json.dumps({"prompt": c.prompt, "text": c.text, "token_ids": c.token_ids,
                              "finish_reason": c.finish_reason}, ensure_ascii=False))
        else:
            print(c.prompt + c.text if len(prompts) == 1 else c.text)
    return 0
