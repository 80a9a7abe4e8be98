"""Putting retrieved passages into a conversation: what `kaki chat` and `kaki serve` call.

The query is the last user message (its question part, if it already carries a context block).
The passages go into that message only, in kaki.chat_format's context block (the format the demo
model is trained on), as many of the top `k` as fit in the prompt budget: the model's context
minus the tokens reserved for the reply minus the conversation as rendered without context.
Earlier turns keep their plain text, so old context never piles up in the history (OpenChatKit
pushed every hit as an extra turn that stayed there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kaki.chat_format import fit_passages, normalize_messages, split_context, with_context
from kaki.citations import format_citations, format_sources  # noqa: F401 (re-exported)
from kaki.config import read_json
from kaki.errors import KakiError
from kaki.retrieval.search import Passage, Retriever

# Passages asked of the index per turn: the demo model is trained with one to three.
DEFAULT_K = 3
MAX_K = 64
# The key a model directory's generation_config.json may carry: how many passages that model
# answers best from, measured (kaki-tiny: 1; among three it copies from the wrong one more often).
MODEL_K_KEY = "retrieval_k"


def retrieval_k(given: int | None, model_dir: str | Path | None) -> int:
    """`--retrieval-k` when given (checked), else the model's own choice (model_retrieval_k)."""
    if given is None:
        return model_retrieval_k(model_dir)
    if not 1 <= given <= MAX_K:
        raise KakiError(f"--retrieval-k must be from 1 to {MAX_K}, got {given}")
    return given


def model_retrieval_k(model_dir: str | Path | None) -> int:
    """The passages per question a model answers best from: its generation_config.json's
    `retrieval_k`, else DEFAULT_K."""
    path = Path(model_dir) / "generation_config.json" if model_dir else None
    if path is None or not path.is_file():
        return DEFAULT_K
    k = read_json(path, "fix or remove its retrieval_k").get(MODEL_K_KEY, DEFAULT_K)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise KakiError(f"{path}: {MODEL_K_KEY} must be an integer from 1 to {MAX_K}, not {str(k)[:40]!r}")
    return k


@dataclass
class Grounding:
    """The messages to render (context inserted) and the passages used, best first."""

    messages: list[dict]
    passages: list[Passage] = field(default_factory=list)
    query: str = ""
    retrieved: int = 0  # passages the index returned before the budget cut


def ground(retriever: Retriever, messages: list[dict], *, fmt, count_tokens: Callable[[str], int],
           max_prompt_tokens: int, k: int = DEFAULT_K, mode: str | None = None) -> Grounding:
    """`messages` with the top passages for the last user message inserted into it.

    fmt: the chat format (kaki.chat_format) the prompt is rendered with; count_tokens: the
    model's tokenizer (text -> token count); max_prompt_tokens: the model's context length minus
    the tokens kept for the reply. With no room (or no user message), nothing is inserted.
    """
    msgs = normalize_messages(messages)
    last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last is None:
        return Grounding(messages=msgs)
    _, question = split_context(msgs[last]["content"])
    query = question.strip()
    if not query:
        return Grounding(messages=msgs)
    hits = retriever.search(query, k=k, mode=mode)
    plain = [*msgs[:last], {"role": "user", "content": question}, *msgs[last + 1:]]
    room = max_prompt_tokens - count_tokens(fmt.render(plain, add_generation_prompt=True))
    kept_ctx = fit_passages([p.as_context() for p in hits], room, count_tokens) if room > 0 else []
    # fit_passages keeps an order-preserving subset; map it back to the Passage objects.
    kept: list[Passage] = []
    j = 0
    for p in hits:
        if j < len(kept_ctx) and p.as_context() == kept_ctx[j]:
            kept.append(p)
            j += 1
    plain[last] = {"role": "user", "content": with_context(question, kept_ctx)}
    return Grounding(messages=plain, passages=kept, query=query, retrieved=len(hits))


