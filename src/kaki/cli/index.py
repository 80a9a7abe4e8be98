"""`kaki index build|query|info`: index one's own documents for retrieval (see docs/retrieval.md)."""

from __future__ import annotations

import json
import sys
import textwrap
import time

PREVIEW_CHARS = 300


def register(sub) -> None:
    p = sub.add_parser("index", help="index documents for retrieval; query an index",
                       description="Build, query and describe a retrieval index: one SQLite file with an "
                                   "FTS5 BM25 index and faiss vectors (see docs/retrieval.md).")
    cmds = p.add_subparsers(dest="index_command", metavar="ACTION", parser_class=type(p))
    cmds.required = True

    b = cmds.add_parser("build", help="create or update an index from files and folders",
                        description="Read .txt .md .rst .html .jsonl files (folders recursively), chunk them "
                                    "into passages and index them. Re-running updates only changed files and "
                                    "drops removed ones.")
    b.add_argument("paths", nargs="*", metavar="PATH",
                   help="files or folders (default when updating: the PATHs of the last build)")
    b.add_argument("--out", "-o", required=True, metavar="INDEX", help="the index file to create or update")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--chunk-sentences", type=int, metavar="N", help="passages of N sentences (default 3)")
    g.add_argument("--chunk-tokens", type=int, metavar="N",
                   help="passages of N tokens (the embedder's tokenizer; words without one)")
    g.add_argument("--no-chunk", action="store_true",
                   help="one passage per section: a JSONL record, or a file's text under one heading")
    b.add_argument("--overlap", type=int, default=0, metavar="M", help="sentences/tokens shared by neighbours")
    b.add_argument("--embedder", default=None, metavar="DIR|default|none",
                   help="sentence-embedding model directory; `none` for BM25 only (default: the index's "
                        "own, for a new index all-MiniLM-L6-v2 when installed)")
    b.add_argument("--dense", default="auto", choices=["auto", "flat", "hnsw", "ivf"],
                   help="faiss index kind (auto: exact up to 100k vectors, then HNSW, then IVF)")
    b.add_argument("--rebuild", action="store_true", help="start the index afresh (needed to change embedder)")
    b.add_argument("--search-mode", choices=["auto", "bm25", "dense", "hybrid"], default=None,
                   help="how queries search this index unless told otherwise (default: keep the index's; "
                        "auto = hybrid when it has vectors, else bm25)")
    b.add_argument("--vectors", metavar="FILE",
                   help="precomputed passage vectors (.npz from recipes/embed_passages.py): used for the "
                        "passages whose exact text and embedder they match, the rest are embedded")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary")
    b.set_defaults(func=run_build)

    q = cmds.add_parser("query", help="print the best passages for a question",
                        description="Search an index and print ranked passages with their source and score.")
    q.add_argument("index", metavar="INDEX")
    q.add_argument("query", metavar="QUESTION")
    q.add_argument("-k", type=int, default=5, help="passages to show (default 5)")
    q.add_argument("--mode", choices=["bm25", "dense", "hybrid"], default=None,
                   help="ranking (default: hybrid when the index has vectors, else bm25)")
    q.add_argument("--embedder", default=None, metavar="DIR",
                   help="the query embedder (default: the one the index records; must be the same model)")
    q.add_argument("--full", action="store_true", help="print whole passages, not previews")
    q.add_argument("--json", action="store_true", help="print JSON lines")
    q.set_defaults(func=run_query)

    i = cmds.add_parser("info", help="describe an index", description="Files, passages, chunking, embedder "
                                                                       "and dense index of an index file.")
    i.add_argument("index", metavar="INDEX")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=run_info)


def _chunking(args):
    from kaki.retrieval import Chunking
    if args.no_chunk:
        return Chunking("none")
    if args.chunk_tokens is not None:
        return Chunking("tokens", args.chunk_tokens, args.overlap)
    if args.chunk_sentences is not None or args.overlap:
        return Chunking("sentences", args.chunk_sentences or 3, args.overlap)
    return None  # the index's own chunking, or the default for a new index


def run_build(args) -> int:
    from kaki.retrieval import build_index
    report = build_index(args.paths, args.out, chunking=_chunking(args), embedder=args.embedder,
                         dense_kind=args.dense, rebuild=args.rebuild, progress=False if args.quiet else None,
                         vectors=args.vectors, search_mode=args.search_mode,
                         log=(lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr)))
    if not args.quiet:
        print(report.summary())
    return 0


def run_query(args) -> int:
    from kaki.retrieval import Retriever
    with Retriever.open(args.index, embedder=args.embedder, mode=args.mode) as r:
        started = time.perf_counter()
        if r.default_mode != "bm25":
            r.warm()  # the embedder's load is most of a dense query's time: say how long it took
            print(f"({r.default_mode} search: loaded the embedder and {r.info()['dense']['vectors']:,} vectors in "
                  f"{time.perf_counter() - started:.1f}s; chat and serve load them once per session, "
                  "--mode bm25 needs neither)", file=sys.stderr)
        hits = r.search(args.query, k=args.k)
    if args.json:
        for p in hits:
            print(json.dumps(p.to_json(), ensure_ascii=False))
        return 0
    if not hits:
        print("no passage matches", file=sys.stderr)
    for p in hits:
        text = p.text if args.full or len(p.text) <= PREVIEW_CHARS else p.text[:PREVIEW_CHARS].rstrip() + " ..."
        scores = " ".join(f"{k} {v:.4g}" for k, v in p.scores.items())
        print(f"[{p.rank}] {p.title}\n    {p.source}  ({scores})")
        print(textwrap.indent(text, "    "))
        print()
    return 0


def run_info(args) -> int:
    from kaki.retrieval import Retriever
    with Retriever.open(args.index) as r:
        info = r.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    emb = info["embedder"]
    dense = info["dense"]
    print(info["path"])
    print(f"  format     {info['format']} v{info['format_version']} ({info['bytes'] / 1e6:.1f} MB, "
          f"updated {info['updated']})")
    print(f"  contents   {info['files']:,} files, {info['passages']:,} passages ({info['chunking']})")
    print(f"  roots      {', '.join(info['roots'])}")
    print(f"  embedder   " + (f"{emb['name']} ({emb['dim']}-dim, {emb['source']})" if emb else "none (BM25 only)"))
    print(f"  dense      " + (dense["description"] if dense else "none"))
    print(f"  search     {info['default_mode']} by default")
    return 0
