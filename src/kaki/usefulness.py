"""Usefulness as a user sees it: is the reply (and the source cited under it) an answer?

Records of data/eval/user-questions.jsonl: `{"question", "passage_ids", "key_terms"}`: a question
as people type it, the passages that answer it, and groups of key terms. Scored three ways, with
the retrieval setting a front end uses (`make chat`: the index's default mode, top 1):

- **reply**: the reply contains a term of every key-term group (case-insensitive), so it names the
  function or idiom that answers the question;
- **citation**: the first cited passage is one that answers the question (hit@1);
- **end to end**: either, since a user who gets a wrong reply but the right source under it can
  read the answer there.

Without retrieval only the reply counts (nothing is cited).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kaki.chat_format import format_for_llm
from kaki.evaluate import check_user_question, qa_prompt  # noqa: F401 (re-exported)


def is_user_question(rec: dict) -> bool:
    return "key_terms" in rec


def useful(reply: str, key_terms: list[list[str]]) -> bool:
    text = reply.lower()
    return all(any(t.lower() in text for t in group) for group in key_terms)


@dataclass
class Usefulness:
    retrieval: bool
    k: int = 0
    mode: str | None = None
    items: list[dict] = field(default_factory=list)

    def share(self, key: str) -> float:
        return sum(i[key] for i in self.items) / len(self.items) if self.items else float("nan")

    @property
    def reply(self) -> float:
        return self.share("reply")

    @property
    def citation(self) -> float:
        return self.share("citation")

    @property
    def end_to_end(self) -> float:
        return self.share("end_to_end")

    def to_json(self) -> dict:
        out = {"reply": self.reply, "citation": self.citation, "end_to_end": self.end_to_end}
        return {**out, "k": self.k, "mode": self.mode} if self.retrieval else {"reply": self.reply}


def usefulness(llm, questions: list[dict], retriever=None, k: int = 1, mode: str | None = None, fmt=None,
               max_new_tokens: int = 64, batch_size: int = 16) -> Usefulness:
    """Greedy replies to user questions, with the top `k` passages `retriever` finds in the prompt
    (cited in rank order), or none."""
    fmt = fmt or format_for_llm(llm)
    result = Usefulness(retriever is not None, k if retriever is not None else 0,
                        (mode or retriever.default_mode) if retriever is not None else None)
    cited = [retriever.search(q["question"], k=k, mode=mode) if retriever is not None else [] for q in questions]
    prompts = [qa_prompt(llm, fmt, {**q, "passages": [h.as_context() for h in hits]}, bool(hits), max_new_tokens)
               for q, hits in zip(questions, cited)]
    for b in range(0, len(prompts), batch_size):
        # Pure greedy: the model's sampling defaults (penalties too) are overridden.
        outs = llm.generate(prompts[b:b + batch_size], add_bos=fmt.add_bos, temperature=0.0,
                            repetition_penalty=1.0, max_new_tokens=max_new_tokens, stop=list(fmt.stop))
        for q, hits, c in zip(questions[b:b + batch_size], cited[b:b + batch_size], outs):
            reply = c.text.strip()
            ok = useful(reply, q["key_terms"])
            hit = bool(hits) and hits[0].ref in q.get("passage_ids", [])
            result.items.append({"question": q["question"], "reply_text": reply,
                                 "cited": [h.ref or h.title for h in hits],
                                 "reply": ok, "citation": hit, "end_to_end": ok or hit})
    return result
