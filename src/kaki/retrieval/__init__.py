"""Retrieval over the user's own documents: `kaki index`, `kaki chat --retrieval`, `kaki serve --retrieval`.

- `build_index(paths, out)`: files -> passages in one SQLite file (FTS5 BM25) + faiss vectors.
- `Retriever.open(index).search(query, k, mode)`: ranked `Passage`s (bm25 | dense | hybrid).
- `ground(retriever, messages, ...)`: the conversation with the top passages that fit the token
  budget inserted, in kaki.chat_format's context block, and the passages used.

Heavy dependencies (faiss, transformers, the embedder) are imported only when dense retrieval is used.
"""

from kaki.retrieval.chunking import Chunking
from kaki.retrieval.grounding import Grounding, format_citations, format_sources, ground
from kaki.retrieval.index import BuildReport, build_index
from kaki.retrieval.search import MODES, Passage, Retriever

__all__ = ["build_index", "BuildReport", "Chunking", "Retriever", "Passage", "MODES", "ground", "Grounding",
           "format_sources", "format_citations"]
