"""Retrieval speed: indexing throughput and query latency (p50/p95) for bm25, dense and hybrid.

    .venv/bin/python benchmarks/retrieval.py                 # 10k and 100k passages
    .venv/bin/python benchmarks/retrieval.py --sizes 10000 --json out.json

The corpus is synthesized from real passages (work/data/passages.jsonl from recipes/prepare_data.py
when present, else the committed data/eval/passages.jsonl) by repeating them with perturbations:
each copy drops ~15% of its words and swaps ~10% for words from elsewhere in the corpus, so BM25
posting lists grow as a real corpus's would rather than holding exact duplicates.

What is timed, each with kaki's own code:
- store: `build_index` (read JSONL, SQLite rows, FTS5 index) with --embedder none, passages/s;
- embed: the default embedder on a sample of real passages, passages/s (embedding every
  synthesized passage would take most of an hour on 2 CPU cores; `--embed-all` does it anyway);
- dense build: faiss over all vectors (exact, and HNSW at the largest size);
- queries: the evaluation questions (repeated) through `Retriever.search` with the query vector
  computed beforehand, so the latencies exclude the embedder; the query embedder's own time is
  reported separately, and hybrid + embedder is their sum per query.

Without --embed-all, the vectors of synthesized passages are their source passage's real vector
plus Gaussian noise (renormalized): the faiss work per query is the same as for real vectors.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from kaki.retrieval import Chunking, Retriever, build_index  # noqa: E402
from kaki.retrieval import dense as dense_mod  # noqa: E402
from kaki.retrieval.embed import Embedder  # noqa: E402
from kaki.retrieval.store import Store  # noqa: E402

FULL = REPO / "work" / "data" / "passages.jsonl"
EVAL = REPO / "data" / "eval" / "passages.jsonl"
QUESTIONS = REPO / "data" / "eval" / "questions.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def synthesize(base: list[dict], n: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    """n passages: the base ones first, then perturbed copies; and each one's base index."""
    rng = random.Random(seed)
    vocab = [w for p in base[:2000] for w in p["text"].split()]
    out, src = [], []
    for i in range(n):
        j = i % len(base)
        p = base[j]
        copy = i // len(base)
        if copy:
            words = [w for w in p["text"].split() if rng.random() > 0.15]
            words = [rng.choice(vocab) if rng.random() < 0.10 else w for w in words]
            p = {"id": f"{p['id']}~{copy}", "title": f"{p['title']} ({copy})", "text": " ".join(words) or p["text"]}
        out.append({"id": p["id"], "title": p["title"], "text": p["text"]})
        src.append(j)
    return out, src


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q))


def lat(xs: list[float]) -> dict:
    return {"p50_ms": round(pct(xs, 50), 2), "p95_ms": round(pct(xs, 95), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated passage counts")
    ap.add_argument("--corpus", type=Path, default=None, help="base passages JSONL (default: see above)")
    ap.add_argument("--embed-sample", type=int, default=512, help="real passages embedded to time the embedder")
    ap.add_argument("--embed-all", action="store_true", help="embed every synthesized passage for real")
    ap.add_argument("--queries", type=int, default=200, help="queries timed per mode")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)

    corpus = args.corpus or (FULL if FULL.is_file() else EVAL)
    base = read_jsonl(corpus)
    questions = [q["question"] for q in read_jsonl(QUESTIONS)]
    queries = [questions[i % len(questions)] for i in range(args.queries)]
    print(f"base corpus: {corpus} ({len(base):,} passages); {len(queries)} queries per mode", flush=True)

    t = time.perf_counter()
    embedder = Embedder()
    load_s = time.perf_counter() - t
    sample = [f"{p['title']}\n{p['text']}" for p in base[:args.embed_sample]]
    t = time.perf_counter()
    embedder.embed(sample)
    embed_rate = len(sample) / (time.perf_counter() - t)
    q_times = []
    qvecs = {}
    for q in queries:
        t = time.perf_counter()
        v = embedder.embed([q])
        q_times.append(time.perf_counter() - t)
        qvecs[q] = v
    results = {"corpus": str(corpus), "embedder_load_s": round(load_s, 2),
               "embed_passages_per_s": round(embed_rate, 1), "query_embed": lat(q_times), "sizes": {}}
    print(f"embedder: load {load_s:.1f}s, {embed_rate:.0f} passages/s (sample of {len(sample)}), "
          f"query embedding p50 {pct(q_times, 50):.1f} ms p95 {pct(q_times, 95):.1f} ms", flush=True)

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(s) for s in args.sizes.split(",")]:
            passages, src = synthesize(base, n)
            data = Path(tmp) / f"synth-{n}.jsonl"
            data.write_text("".join(json.dumps(p) + "\n" for p in passages))
            index = Path(tmp) / f"synth-{n}.kaki-index"
            t = time.perf_counter()
            build_index([data], index, chunking=Chunking("none"), embedder="none", rebuild=True, progress=False)
            store_s = time.perf_counter() - t

            # Vectors: real for the base passages that were embedded, perturbed copies for the rest.
            n_real = n if args.embed_all else min(len(base), max(args.embed_sample, 1))
            texts = [f"{p['title']}\n{p['text']}" for p in passages[:n_real]]
            t = time.perf_counter()
            real = embedder.embed(texts)
            real_s = time.perf_counter() - t
            vecs = np.empty((n, embedder.dim), dtype=np.float32)
            vecs[:n_real] = real
            if n_real < n:
                noisy = real[np.asarray(src[n_real:]) % n_real] + 0.02 * rng.standard_normal((n - n_real, embedder.dim))
                vecs[n_real:] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
            store = Store.open(index, write=True)
            ids = [i for (i,) in store.conn.execute("SELECT id FROM passages ORDER BY id")]
            store.conn.execute("BEGIN")
            store.set_vectors(ids, vecs)
            kinds = ["flat", "hnsw"] if n == max(int(s) for s in args.sizes.split(",")) else ["flat"]
            builds = {}
            for kind in kinds:
                t = time.perf_counter()
                built = dense_mod.build(vecs, np.asarray(ids), kind)
                builds[kind] = (time.perf_counter() - t, dense_mod.serialize(built))
            store.set_meta(embedder=embedder.spec.to_json())
            store.put_dense("flat", n, builds["flat"][1])
            store.conn.execute("COMMIT")
            store.close()
            row = {"store_passages_per_s": round(n / store_s, 1), "store_s": round(store_s, 2),
                   "embedded_for_real": n_real, "embed_s": round(real_s, 2),
                   "dense_build_s": {k: round(v[0], 2) for k, v in builds.items()},
                   "index_mb": round(index.stat().st_size / 1e6, 1), "latency": {}}
            for kind in kinds:
                if kind != "flat":
                    store = Store.open(index, write=True)
                    store.put_dense(kind, n, builds[kind][1])
                    store.close()
                with Retriever.open(index) as r:
                    r.warm()
                    for mode in ("bm25", "dense", "hybrid"):
                        if kind != "flat" and mode == "bm25":
                            continue
                        r.search(queries[0], k=5, mode=mode, query_vector=qvecs[queries[0]])  # warm caches
                        times = []
                        for q in queries:
                            t = time.perf_counter()
                            r.search(q, k=5, mode=mode, query_vector=qvecs[q])
                            times.append(time.perf_counter() - t)
                        name = mode if kind == "flat" or mode == "bm25" else f"{mode}[{kind}]"
                        row["latency"][name] = lat(times)
                        if mode == "hybrid":
                            row["latency"][name + "+embed"] = lat([a + b for a, b in zip(times, q_times)])
            results["sizes"][n] = row
            lines = [f"{n:,} passages: store {row['store_passages_per_s']:,.0f} passages/s ({store_s:.1f}s), "
                     f"dense build " + ", ".join(f"{k} {v:.1f}s" for k, v in row["dense_build_s"].items())
                     + f", index {row['index_mb']} MB"]
            for name, v in row["latency"].items():
                lines.append(f"  {name:<22} p50 {v['p50_ms']:7.2f} ms   p95 {v['p95_ms']:7.2f} ms")
            print("\n".join(lines), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
