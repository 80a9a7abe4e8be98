"""`kaki chat`: talk to a model in the terminal (or through a pipe)."""

from __future__ import annotations

import sys

from kaki.cli.common import add_model_args, add_sampling_args, default_model, load_from_args, sampling_kwargs


def register(sub) -> None:
    from kaki.chat_format import FORMATS

    p = sub.add_parser("chat", help="chat with a model (the bundled kaki-tiny by default)",
                       description="An interactive chat: type messages, /help lists the commands. "
                                   "Reads lines from a pipe too: printf 'Hello\\n/quit\\n' | kaki chat")
    add_model_args(p)
    p.add_argument("--chat-format", default="auto", choices=FORMATS,
                   help="how the conversation becomes text (auto: the tokenizer's chat_template, else "
                        "adept for Persimmon, openchatkit for GPT-NeoX, plain otherwise)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system text kept at the top of the conversation")
    add_sampling_args(p)
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print each reply when it is complete instead of as it is generated")
    p.set_defaults(func=run)


def run(args) -> int:
    from kaki.chat import ChatSession, Settings
    from kaki.chat.shell import ChatShell
    from kaki.chat_format import format_for_llm
    from kaki.errors import KakiError

    if args.model is None and default_model() is None:
        raise KakiError("no --model given and the bundled demo model models/kaki-tiny is not in this "
                        "checkout; build it with recipes/kaki-tiny.sh, or pass --model DIR")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"[loading {args.model or default_model()} ...]", file=sys.stderr, flush=True)
    llm = load_from_args(args)
    fmt = format_for_llm(llm, args.chat_format)
    kw = sampling_kwargs(args)
    stop = kw.pop("stop", [])
    settings = Settings.from_params(llm.sampling(**kw))
    session = ChatSession(llm, fmt, system=args.system, settings=settings, stop=stop)
    cfg = llm.config
    banner = (f"kaki chat: {llm.path or args.model} ({cfg.model_type}, {cfg.num_parameters() / 1e6:,.1f}M "
              f"parameters, context {llm.context_length:,}, chat format {fmt.name}). Type a message; "
              "/help lists the commands; Ctrl-C stops a reply; Ctrl-D quits.")
    return ChatShell(session, stream=args.stream).run(banner)
