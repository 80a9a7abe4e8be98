"""`kaki serve`: the HTTP server (Adept's PUT /api and the OpenAI API) with continuous batching."""

from __future__ import annotations

import ipaddress
import os
import signal
import sys

from kaki.cli.common import (add_model_args, add_moderation_args, add_tensor_parallel_arg, load_from_args,
                             moderator_from_args, start_ranks)
from kaki.cli.speculate import add_speculate_args, apply_speculate


def register(sub) -> None:
    from kaki.chat_format import FORMATS

    p = sub.add_parser("serve", help="serve a model over HTTP (Adept's /api and the OpenAI API)",
                       description="Serve a model over HTTP: Adept's PUT /api, OpenAI's /v1/completions, "
                                   "/v1/chat/completions and /v1/models, /health and /metrics. Requests are "
                                   "batched continuously. See docs/serve.md for examples.")
    add_model_args(p)
    add_tensor_parallel_arg(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback only; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every route but /health[z]. Prefer "
                        "$KAKI_API_KEY or --api-key-file: a key on the command line shows in `ps` "
                        "(default: $KAKI_API_KEY; none: open)")
    p.add_argument("--api-key-file", metavar="PATH", default=None,
                   help="read the API key from this file (its first line; e.g. a mounted secret)")
    p.add_argument("--max-body-mb", type=float, default=None,
                   help="largest request body accepted, in MB; larger ones get 413 before they are read "
                        "(default 16)")
    p.add_argument("--max-batch-size", type=int, default=None,
                   help="sequences decoded together (default 32)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + reply tokens per sequence (default: the model's context)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="sequences waiting for a slot before requests get 503 (default 256)")
    p.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="prompt tokens prefilled per step (default 2048): more admits bursts faster, "
                        "fewer keeps running replies flowing")
    p.add_argument("--prefix-cache-mb", type=float, default=None,
                   help="memory for keys and values of prompt prefixes kept across requests (a shared system "
                        "prompt, a growing conversation, n > 1 prefill once), in MB (default 1024; 0: off)")
    p.add_argument("--chat-format", default="auto", choices=FORMATS,
                   help="how /v1/chat/completions renders messages (auto: the model's chat_template, "
                        "else by model family)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id for /v1 (default: the model directory's name)")
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM/Ctrl-C")
    p.add_argument("--retrieval", metavar="INDEX", default=None,
                   help="ground /v1/chat/completions answers in an index from `kaki index build` (a request's "
                        "`retrieval: false` opts out; the passages used come back in `sources`)")
    p.add_argument("--retrieval-k", type=int, default=None, metavar="K",
                   help="passages retrieved per request, best first (default: the model's "
                        "generation_config.json retrieval_k, else 3)")
    add_moderation_args(p)
    add_speculate_args(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from kaki.errors import KakiError

    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise KakiError(f"kaki serve needs the serve extra ({e.name} is missing): "
                        "pip install 'kaki[serve]'") from None
    from kaki.serve.app import DEFAULT_MAX_BODY_MB, create_app
    from kaki.serve.engine import Engine, EngineConfig

    args.api_key = resolve_api_key(args)
    max_body_mb = DEFAULT_MAX_BODY_MB if args.max_body_mb is None else args.max_body_mb
    if not max_body_mb > 0:
        raise KakiError(f"--max-body-mb must be a positive number of MB, got {args.max_body_mb}")
    if not is_loopback(args.host) and not args.api_key:
        print(f"kaki serve: warning: binding {args.host} without --api-key: anyone who can reach this "
              "machine can use the model; set KAKI_API_KEY (or pass --api-key-file PATH)", file=sys.stderr)
    if not 0 < args.port < 65536:
        raise KakiError(f"--port must be 1-65535, got {args.port}")
    moderator = moderator_from_args(args)  # first: a bad --moderation-block fails before the big load
    llm = load_from_args(args)
    if not start_ranks(llm):
        return 0  # another rank of a tensor-parallel job: rank 0 serves HTTP and runs the scheduler
    apply_speculate(llm, args)  # every request's default (the engine's scheduler reads it)
    config = EngineConfig()
    for name in ("max_batch_size", "max_seq_len", "max_queue", "max_prefill_tokens", "prefix_cache_mb"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    name = args.served_model_name or (Path(llm.path).name if llm.path else "kaki")
    engine = Engine(llm, config, model_name=name)
    retriever = None
    if args.retrieval:
        from kaki.retrieval import Retriever
        retriever = Retriever.open(args.retrieval)
        retriever.warm()  # load the embedder at start-up, not in the first request
    from kaki.retrieval.grounding import retrieval_k
    app = create_app(engine, api_key=args.api_key, chat_format=args.chat_format, retriever=retriever,
                     retrieval_k=retrieval_k(args.retrieval_k, llm.path), moderator=moderator,
                     max_body_mb=max_body_mb)
    print(f"kaki serve: {name} on http://{_url_host(args.host)}:{args.port} (batch {config.max_batch_size}, "
          f"{engine.max_seq_len:,} tokens per sequence, {engine.model.dtype}, {engine.model.device})",
          file=sys.stderr)
    if moderator is not None:
        print(f"kaki serve: moderation by {moderator.describe()}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.graceful_timeout))
    if getattr(llm.model, "leader", None) is not None:
        # uvicorn raises the SIGTERM it handled again once it has shut down: ignored, so that the
        # other ranks are told to stop below and the job ends cleanly (torchrun then waits for them).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    server.run()  # uvicorn turns SIGTERM/SIGINT into a graceful shutdown
    return stop_ranks(llm)


def stop_ranks(llm) -> int:
    """Let a tensor-parallel job's other ranks go; 1 when one of them was lost (which stopped us)."""
    from kaki.engine import mirror

    why = mirror.stop(llm)
    if why is not None:
        print(f"kaki serve: error: {why}", file=sys.stderr)
    return 1 if why else 0


def resolve_api_key(args) -> str | None:
    """The key from --api-key, --api-key-file or $KAKI_API_KEY (None: the server is open). An
    empty one is refused: it would silently leave the server open."""
    from kaki.errors import KakiError

    if args.api_key is not None and args.api_key_file is not None:
        raise KakiError("give the API key once: --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, encoding="utf-8") as f:
                key = f.read(4096).split("\n", 1)[0].strip()
        except (OSError, UnicodeDecodeError) as e:
            raise KakiError(f"--api-key-file {args.api_key_file}: cannot read it ({e.__class__.__name__}: "
                            f"{getattr(e, 'strerror', None) or e})") from None
        where = f"--api-key-file {args.api_key_file} is empty"
    elif args.api_key is not None:
        key, where = args.api_key, "--api-key is empty"
    else:
        key = os.environ.get("KAKI_API_KEY")
        if key is None:
            return None
        where = "KAKI_API_KEY is set but empty"
    if not key.strip():
        raise KakiError(f"{where}: an empty key would leave the server open; give a key, or leave the "
                        "key out entirely to serve without one")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
