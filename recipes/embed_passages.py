"""Ship the demo corpus's passage vectors: read a hybrid index built from data/pydocs and write
its vectors as float16 to data/pydocs/vectors.npz, so `make index` (and the first `make chat`)
builds the hybrid index without embedding 14k passages (minutes on a laptop CPU).

    kaki index build work/index/pydocs-passages.jsonl --out /tmp/pydocs-hybrid.kaki-index --no-chunk
    python recipes/embed_passages.py --index /tmp/pydocs-hybrid.kaki-index --out data/pydocs/vectors.npz

The file keys every vector by a hash of the text the embedder saw and records the embedder's spec,
so it is only ever used for the same text and the same model (tests/test_index_vectors.py checks
the shipped file covers every shipped passage).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from kaki.retrieval import vectors
from kaki.retrieval.embed import EmbedderSpec
from kaki.retrieval.store import Store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", required=True, help="a hybrid index built from the corpus")
    ap.add_argument("--out", required=True, help="the vector file to write (.npz)")
    args = ap.parse_args()
    store = Store.open(args.index)
    try:
        meta = store.meta()
        if meta.get("embedder", "none") == "none":
            raise SystemExit(f"{args.index} has no dense vectors (built with --embedder none)")
        spec = EmbedderSpec.from_json(meta["embedder"])
        rows = store.conn.execute("SELECT title, text, vector FROM passages WHERE vector IS NOT NULL ORDER BY id").fetchall()
    finally:
        store.close()
    texts = [vectors.passage_text(title, text) for title, text, _ in rows]
    vecs = np.stack([np.frombuffer(v, dtype=np.float32) for _, _, v in rows])
    vectors.save(args.out, spec, texts, vecs)
    print(json.dumps({"passages": len(texts), "dim": spec.dim, "embedder": spec.name, "out": args.out,
                      "corpus_sha256": vectors.corpus_hash(texts)}))


if __name__ == "__main__":
    main()
