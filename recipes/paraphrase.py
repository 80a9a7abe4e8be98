"""User-style paraphrases of the questions recipes/prepare_data.py asks of each passage.

The generated training questions are written like documentation ("Which function returns the
square root of x?"); people type "python square root of x" or "how do i check if a path exists".
kaki-tiny answered the first kind and garbled the second (issue #19), so this turns each passage's
own description (its first sentence, or a section's title) into the short, lowercase forms people
use. Everything comes from the passage: no evaluation question is read or used as a template
(tests/test_user_questions.py checks that none is generated).
"""

from __future__ import annotations

import random
import re

import rst
from prepare_data import (CALLABLES, GERUNDS, NOT_VERBS, PROSE_DIRS, _short, answer_for, lookup_answer,
                          sentences)

# How people phrase a request, from most to least common in search logs' style: a bare phrase,
# "python ..." and "how do i ...". Lowercase and no question mark, as typed.
VP_TEMPLATES = ("how do i {vp}", "how to {vp}", "how to {vp} in python", "python {vp}", "{vp} python",
                "{vp}", "{vp} in python", "how can i {vp}", "is there a function to {vp}",
                "best way to {vp}")
NAME_TEMPLATES = ("python {name}", "{name} python", "what does {name} do", "{short} in {module}",
                  "how to use {name}", "{name} example")
# Words a keyword-style query drops ("python square root x").
STOPWORDS = {"a", "an", "the", "of", "to", "in", "is", "for", "and", "with", "that", "this", "its", "it",
             "be", "by", "as", "or", "on", "at", "from", "which", "are", "given", "specified"}
# A description is cut at the first of these: users type the gist, not the qualifications.
_CUT = re.compile(r",|;|:|\. | \(| -- | — | if | unless | when | using | which | so that | as a | as an ")
MAX_VP_WORDS = 9
# First words that look like an imperative but open a noun phrase ("Decorator for tests ...").
NOT_IMPERATIVE = {"decorator", "given", "shorthand", "synonym", "abstract", "base", "flag", "constant",
                  "context", "wrapper", "helper", "class", "method", "function", "number", "name", "list",
                  "string", "dictionary", "boolean", "integer", "version", "deprecated", "optional"}
# Third-person verbs the docs sometimes open with, back to the imperative a user types.
_IRREGULAR = {"does": "do", "is": "be", "has": "have", "goes": "go"}


def imperative(verb: str) -> str:
    v = verb.lower()
    if v in _IRREGULAR:
        return _IRREGULAR[v]
    if v.endswith("ies"):
        return v[:-3] + "y"
    if v.endswith(("sses", "shes", "ches", "xes", "zes")):
        return v[:-2]
    if v.endswith("s") and not v.endswith("ss"):
        return v[:-1]
    return v


def gist(text: str) -> str:
    """The head of a description: up to the first qualification, at most MAX_VP_WORDS words,
    lowercase, markup dropped."""
    text = _CUT.split(text, maxsplit=1)[0]
    text = re.sub(r"[*`\"“”]|_\b", "", text)
    words = text.lower().split()[:MAX_VP_WORDS]
    while words and words[-1] in STOPWORDS:  # "get the name of the (text file)" -> "get the name"
        words.pop()
    return " ".join(words).rstrip(".")


def verb_phrase(p: rst.Passage) -> str | None:
    """What a callable does, as the request a user types: "Return the square root of x." ->
    "get the square root of x"; "Return True if the path exists." -> "check if the path exists"."""
    first = sentences(p.first_paragraph)[:1]
    if not first or "`" in first[0]:
        return None
    s = first[0].rstrip(".:;")
    head, _, rest = s.partition(" ")
    if head.lower() == "this" and rest.startswith(("function ", "method ")):
        head, _, rest = rest.split(" ", 1)[1].partition(" ")
    if (not rest or not head.isalpha() or head.lower() in NOT_VERBS | NOT_IMPERATIVE
            or not head[:1].isupper()):
        return None
    verb = imperative(head)
    if verb == "return":
        for lead, as_check in (("True if ", "check if "), ("true if ", "check if "), ("whether ", "check whether ")):
            if rest.startswith(lead):
                return as_check + gist(rest[len(lead):])
        verb = "get"
    vp = gist(f"{verb} {rest}")
    return vp if len(vp.split()) >= 3 else None


def keywords(vp: str) -> str:
    return " ".join(w for w in vp.split() if w not in STOPWORDS)


def section_phrases(p: rst.Passage) -> list[str]:
    """A prose section's title as people ask it: an FAQ's "How do I X?" and a howto's
    "Sorting lists" both become "how do i sort lists", "sort lists python", ..."""
    if not p.source.startswith(PROSE_DIRS):
        return []
    title = p.title.rpartition(": ")[2].split(" (")[0].strip()
    low = " ".join(re.sub(r"[*`\"“”]", "", title).lower().split()).rstrip("?.! ")
    for lead in ("how do i ", "how can i ", "how do you ", "how can you "):
        if low.startswith(lead):
            vp = low[len(lead):]
            return [low, f"how to {vp}", f"{vp} python", f"python {vp}", vp]
    words = low.split()
    if words and words[0] in GERUNDS and len(words) >= 2:
        vp = " ".join([GERUNDS[words[0]]] + words[1:])
        return [f"how do i {vp}", f"how to {vp}", f"{vp} python", f"python {vp}", f"{vp} in python"]
    if title.endswith("?") and len(words) >= 4:
        return [low, f"{low} python"]
    return []


def user_questions(p: rst.Passage, rng: random.Random, n: int = 2) -> list[str]:
    """Up to `n` different user-style questions answered by `p` (none when its description does
    not turn into one)."""
    pool: list[str] = []
    if p.kind == "section":
        pool = section_phrases(p)
    elif p.kind in CALLABLES:
        vp = verb_phrase(p)
        if vp:
            pool = [t.format(vp=vp) for t in VP_TEMPLATES] + [f"python {keywords(vp)}", keywords(vp)]
        if p.module and p.title.startswith(p.module + "."):
            name = p.title.lower()
            pool += [t.format(name=name, short=_short(name), module=p.module) for t in NAME_TEMPLATES[:2]]
    elif p.kind == "exception":
        s = (sentences(p.first_paragraph) or [""])[0]
        if s.startswith("Raised when "):
            when = gist(s[len("Raised "):])
            pool = [f"what error is raised {when}", f"python error {when}", f"exception {when}"]
    pool = list(dict.fromkeys(q for q in pool if 3 <= len(q.split()) <= 14))
    rng.shuffle(pool)
    return pool[:n]


def user_answer(p: rst.Passage) -> str:
    """A section answers with its first sentences; an entry names itself first (the name is what
    a user asked for), as the lookup drills do."""
    return answer_for(p) if p.kind == "section" else lookup_answer(p)


# What a typed question is asking once its framing is gone: "python remove duplicates from a
# list?" and "How do I remove duplicates from a list" ask the same as "remove duplicates from a list".
_FRAMES = ("how do i ", "how can i ", "how do you ", "how to ", "python ", "is there a function to ",
           "best way to ", "what does ")
_TAILS = (" in python", " python", " do")


def core(question: str) -> str:
    q = " ".join("".join(c for c in question.lower() if c.isalnum() or c.isspace()).split())
    for frame in _FRAMES:
        q = q.removeprefix(frame)
    for tail in _TAILS:
        q = q.removesuffix(tail)
    return q


def paraphrases(passages: list[rst.Passage], usable, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`{"question", "passage_id", "answer"}` records, not yet grounded: recipes/user_drills.py
    puts the passage the demo index retrieves for each question in front of it. A question whose
    core (see `core`) is in `exclude` is left out: the evaluation sets' questions are, so that
    none is trained on even where a passage's own title asks it the same way (the FAQ's "How do
    you remove duplicates from a list?")."""
    out = []
    for p in passages:
        if not usable(p):
            continue
        rng = random.Random(f"{seed}:user:{p.id}")
        for q in user_questions(p, rng):
            if core(q) not in exclude:
                out.append({"question": q, "passage_id": p.id, "answer": user_answer(p)})
    return out
