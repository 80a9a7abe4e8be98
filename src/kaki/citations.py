"""How a retrieved passage is cited to the user: `/sources` in chat and the lines under a grounded
reply. Kept apart from kaki.retrieval (which needs numpy and faiss), so the chat shell can cite
without them; works on `Passage`s or their `to_json()` dicts (what a chat session keeps)."""

from __future__ import annotations


def _row(p) -> dict:
    return p.to_json() if hasattr(p, "to_json") else p


def where(p: dict) -> str:
    """A passage's url, else `path:line` (`source` in conversations saved before sources[] had `path`)."""
    if p.get("url"):
        return p["url"]
    if "path" in p:
        return f"{p['path']}#{p['ref']}" if p.get("ref") else f"{p['path']}:{p.get('line', '?')}"
    return p.get("source", "?")


def format_sources(passages: list) -> str:
    """What `/sources` prints: one entry per passage used, numbered as in the context block."""
    if not passages:
        return "(no passages were used for the last answer)"
    rows = [_row(p) for p in passages]
    return "\n".join(f"[{i}] {p['title']}\n    {where(p)}  (score {p.get('score', float('nan')):.4g})"
                     for i, p in enumerate(rows, 1))


def format_citations(passages: list) -> str:
    """The lines shown under a grounded reply: one per passage the model was given, its title and
    where to read it (the docs URL when the index knows one, else path and line)."""
    return "\n".join(f"  [{i}] {p['title']}: {where(p)}" for i, p in enumerate(map(_row, passages), 1))
