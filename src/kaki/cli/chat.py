"""`kaki chat`: talk to a model in the terminal (or through a pipe)."""

from __future__ import annotations

import sys

from kaki.cli.speculate import add_speculate_args, apply_speculate
from kaki.cli.common import (add_model_args, add_moderation_args, add_sampling_args, add_tensor_parallel_arg,
                             default_model, load_from_args, moderator_from_args, sampling_kwargs, start_ranks)


def register(sub) -> None:
    from kaki.chat_format import FORMATS

    p = sub.add_parser("chat", help="chat with a model (the bundled kaki-tiny by default)",
                       description="An interactive chat: type messages, /help lists the commands. "
                                   "Reads lines from a pipe too: printf 'Hello\\n/quit\\n' | kaki chat")
    add_model_args(p)
    add_tensor_parallel_arg(p)
    p.add_argument("--chat-format", default="auto", choices=FORMATS,
                   help="how the conversation becomes text (auto: the tokenizer's chat_template, else "
                        "adept for Persimmon, openchatkit for GPT-NeoX, plain otherwise)")
    p.add_argument("--system", default=None, metavar="TEXT", help="system text kept at the top of the conversation")
    add_sampling_args(p)
    p.add_argument("--echo", action="store_true",
                   help="print each message read from a pipe before its reply (`>>> message`), so a "
                        "transcript shows questions and answers; stdout is replies only without it")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="print each reply when it is complete instead of as it is generated")
    p.add_argument("--retrieval", metavar="INDEX", default=None,
                   help="ground answers in an index from `kaki index build`: the best passages go into each "
                        "question's prompt; /sources shows them (see docs/retrieval.md)")
    p.add_argument("--retrieval-k", type=int, default=None, metavar="K",
                   help="passages retrieved per question, best first, as many as fit (default: the "
                        "model's generation_config.json retrieval_k, else 3)")
    add_moderation_args(p)
    add_speculate_args(p)
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
        # A shell started from a non-interactive parent's background job inherits SIGINT ignored,
        # and Python then never raises KeyboardInterrupt: Ctrl-C must stop replies here anyway.
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"[loading {args.model or default_model()} ...]", file=sys.stderr, flush=True)
    moderator = moderator_from_args(args)  # first: a bad --moderation-block fails before the big load
    llm = load_from_args(args)
    apply_speculate(llm, args)  # before the ranks part: a refused draft model stops every rank
    if not start_ranks(llm):
        return 0  # another rank of a tensor-parallel job: rank 0 reads the terminal
    fmt = format_for_llm(llm, args.chat_format)
    kw = sampling_kwargs(args)
    stop = kw.pop("stop", [])
    settings = Settings.from_params(llm.sampling(**kw))
    retrieve = None
    if args.retrieval:
        from kaki.retrieval import Retriever
        from kaki.retrieval.grounding import retrieval_k
        retriever = Retriever.open(args.retrieval)
        retriever.warm()  # load the embedder now, not during the first question
        k = retrieval_k(args.retrieval_k, llm.path)
        retrieve = lambda q: [p.to_json() for p in retriever.search(q, k=k)]  # noqa: E731
    session = ChatSession(llm, fmt, system=args.system, settings=settings, stop=stop, retrieve=retrieve,
                          moderator=moderator)
    cfg = llm.config
    banner = (f"kaki chat: {llm.path or args.model} ({cfg.model_type}, {cfg.num_parameters() / 1e6:,.1f}M "
              f"parameters, context {llm.context_length:,}, chat format {fmt.name}). Type a message; "
              "/help lists the commands; Ctrl-C stops a reply; Ctrl-D quits."
              + (f" Answers use passages from {args.retrieval} (/sources)." if args.retrieval else "")
              + (f" Moderation: {moderator.describe()}; replies show once checked." if moderator else ""))
    return ChatShell(session, stream=args.stream, echo=args.echo).run(banner)
