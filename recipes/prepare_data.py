"""Training and evaluation data for kaki-tiny from the Python documentation's reST sources.

    python recipes/prepare_data.py --src /usr/share/doc/python3.11/html/_sources --out WORKDIR \\
        [--eval-out data/eval]

Reads every `*.rst.txt` (or `*.rst`) under --src (Debian's python3.11-doc package ships them; the
Python documentation is (c) Python Software Foundation, PSF License), and writes into WORKDIR:

- `pretrain.jsonl`: `{"text"}` records, the docs as readable text, in chunks of whole paragraphs.
- `chat.jsonl`: `{"messages"}` question/answer conversations generated from the docs' structure
  ("What does json.dumps() do?" answered with the entry's first sentences); about half carry one to
  three passages (the gold one and distractors) in the user turn, in kaki.chat_format's context
  block; about one in ten has a follow-up exchange.
- `passages.jsonl`: every passage (id, title, source, text, held_out), for retrieval experiments.
- `stats.json`: sizes.

A few hundred whole passages (doc entries, section openings, glossary terms) are held out, chosen
by a hash of their name, so the choice is the same on every machine and for every subset of the
sources: none of their text reaches pretrain.jsonl or chat.jsonl. With --eval-out they are written
to `EVAL_OUT/passages.jsonl` (the evaluation questions in `questions.jsonl` there are written by
hand and are never touched by this script; their passage ids are checked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rst  # noqa: E402
from doc_urls import doc_url  # noqa: E402

from kaki.chat_format import with_context  # noqa: E402

# Held out: this many per thousand of the candidate passages (see is_candidate).
HOLDOUT_PER_MILLE = 30
# Passage text in a context block: whole sentences up to this many characters (~150-250 tokens of
# an 8k-piece tokenizer), so three passages and a reply fit in a 1024-token context.
PASSAGE_CHARS = 800
ANSWER_CHARS = 320
CONTEXT_SHARE = 0.5
FOLLOW_UP_SHARE = 0.1
PRETRAIN_CHUNK_CHARS = 6000
PY_ENTRIES = {"function", "class", "method", "data", "attribute", "exception", "classmethod",
              "staticmethod", "decorator", "coroutinefunction", "coroutinemethod", "abstractmethod"}
PROSE_DIRS = ("library/", "tutorial/", "howto/", "faq/", "reference/")


def read_sources(src: Path) -> list[tuple[str, str]]:
    files = sorted(list(src.rglob("*.rst.txt")) + list(src.rglob("*.rst")))
    if not files:
        raise SystemExit(f"no .rst.txt or .rst files under {src}; install the docs with "
                         "`apt-get install -y python3.11-doc` and pass "
                         "--src /usr/share/doc/python3.11/html/_sources")
    out = []
    for f in files:
        name = str(f.relative_to(src))
        name = name[:-len(".rst.txt")] if name.endswith(".rst.txt") else name[:-len(".rst")]
        out.append((name, f.read_text(encoding="utf-8", errors="replace")))
    return out


def stable_hash(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def is_candidate(p: rst.Passage) -> bool:
    """Passages an evaluation question could be about: Python-level entries of the library
    reference, and section openings and glossary terms of the prose docs, with a real first
    paragraph."""
    if len(p.first_paragraph) < 40:
        return False
    if p.kind in PY_ENTRIES:
        return p.source.startswith("library/")
    if p.kind == "section":
        return p.source.startswith(PROSE_DIRS)
    return p.kind == "term"


def holdout_key(p: rst.Passage) -> str:
    # Entries by qualified name, so an object documented twice is held out everywhere.
    return f"{p.kind}:{p.title}" if p.kind != "section" else p.id


def is_held_out(p: rst.Passage) -> bool:
    return is_candidate(p) and stable_hash(holdout_key(p)) % 1000 < HOLDOUT_PER_MILLE


# ----------------------------------------------------------------------------- text helpers

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def first_sentences(text: str, limit: int) -> str:
    out = ""
    for s in sentences(text):
        if out and len(out) + 1 + len(s) > limit:
            break
        out = f"{out} {s}".strip()
    return out


def trim_passage(text: str, limit: int = PASSAGE_CHARS) -> str:
    """Whole paragraphs, then whole sentences (or lines of code), up to `limit` characters."""
    out: list[str] = []
    n = 0
    for para in text.split("\n\n"):
        if n + len(para) <= limit:
            out.append(para)
            n += len(para) + 2
            continue
        if not out or n < limit // 2:
            part = first_sentences(para, limit - n) if not para.startswith(" ") else ""
            if part:
                out.append(part)
        break
    return "\n\n".join(out).strip()


def context_title(p: rst.Passage) -> str:
    return f"{p.title} ({p.source})"


def as_context(p: rst.Passage) -> dict:
    return {"title": context_title(p), "text": trim_passage(p.text)}


# ----------------------------------------------------------------------------- questions

GERUNDS = {"using": "use", "creating": "create", "writing": "write", "running": "run",
           "installing": "install", "handling": "handle", "making": "make", "defining": "define",
           "reading": "read", "accessing": "access", "adding": "add", "calling": "call",
           "getting": "get", "setting": "set", "building": "build", "configuring": "configure",
           "customizing": "customize", "debugging": "debug", "embedding": "embed",
           "extending": "extend", "importing": "import", "logging": "log", "parsing": "parse",
           "sorting": "sort", "testing": "test", "working": "work", "sending": "send",
           "specifying": "specify", "finding": "find", "invoking": "invoke", "passing": "pass",
           "avoiding": "avoid", "converting": "convert", "comparing": "compare",
           "registering": "register", "subclassing": "subclass", "implementing": "implement",
           "dealing": "deal", "managing": "manage", "controlling": "control", "changing": "change",
           "formatting": "format", "storing": "store", "loading": "load", "saving": "save",
           "executing": "execute", "distributing": "distribute", "porting": "port"}


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def questions_for(p: rst.Passage, rng: random.Random) -> list[str]:
    name, kind = p.title, p.kind
    first = p.first_paragraph
    returns = first.startswith(("Return ", "Returns "))
    if kind in ("function", "coroutinefunction", "decorator"):
        qs = [f"What does {name}() do?", f"What is {name} used for?", f"Explain the function {name}."]
        if p.module and name.startswith(p.module + "."):
            qs.append(f"What does the {_short(name)} function in the {p.module} module do?")
        if returns:
            qs += [f"What does {name}() return?", f"What does the function {name} return?"]
    elif kind in ("method", "classmethod", "staticmethod", "coroutinemethod", "abstractmethod"):
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        qs = [f"What does {name}() do?", f"What does the {_short(name)} method of {owner} do?"
              if owner else f"What does the {name} method do?"]
        if returns:
            qs.append(f"What does the {name}() method return?")
    elif kind == "class":
        qs = [f"What is {name}?", f"What is the {_short(name)} class for?",
              f"What does the class {name} represent?"]
    elif kind == "exception":
        qs = [f"When is {name} raised?", f"What is the {_short(name)} exception?"]
    elif kind in ("data", "attribute"):
        qs = [f"What is {name}?", f"What does {name} hold?"]
    elif kind.startswith("c:"):
        qs = [f"What does the C API {'function ' if kind == 'c:function' else ''}{name} do?",
              f"What is {name} in the C API?"]
    elif kind == "cmdoption":
        qs = [f"What does the {name} option do?", f"What is the {name} command-line option for?"]
    elif kind == "envvar":
        qs = [f"What is the {name} environment variable for?", f"What does {name} do?"]
    elif kind == "opcode":
        qs = [f"What does the {name} bytecode instruction do?"]
    elif kind == "pdbcommand":
        qs = [f"What does the pdb command {name} do?"]
    elif kind == "term":
        article = "an" if name[:1].lower() in "aeiou" else "a"
        qs = [f"What is {article} {name} in Python?", f"What does the term {name} mean?"]
    elif kind == "section":
        qs = section_questions(p)
    else:
        qs = [f"What is {name}?"]
    return qs


def section_questions(p: rst.Passage) -> list[str]:
    doc, _, title = p.title.rpartition(": ")
    words = title.split()
    if words and words[0].lower() in GERUNDS:
        rest = " ".join(words[1:])
        return [f"How do I {GERUNDS[words[0].lower()]} {rest}?".replace("  ", " ")]
    if p.source.startswith("whatsnew/") and doc:
        return [f"What changed for {title} in {doc.replace('What’s New', 'What’s new')}?",
                f"{doc}: what is new in {title}?"]
    if doc:
        return [f"What does the documentation say about {title} in {doc}?",
                f"Tell me about {title} ({doc})."]
    return [f"What is {title} about?", f"Tell me about {title}."]


def answer_for(p: rst.Passage) -> str:
    return first_sentences(p.first_paragraph, ANSWER_CHARS)


# ----------------------------------------------------------------------------- building the data

def build(sources: list[tuple[str, str]], seed: int = 0):
    # Pass 1: all passages, to choose the held-out ones; pass 2: the text without them.
    passages: list[rst.Passage] = []
    for name, text in sources:
        passages += rst.render_file(text, name)[1]
    held = {p.id for p in passages if is_held_out(p)}
    pretrain: list[dict] = []
    for name, text in sources:
        body, _ = rst.render_file(text, name, skip=held)
        for chunk in chunk_text(body, PRETRAIN_CHUNK_CHARS):
            pretrain.append({"text": chunk})
    train_passages = [p for p in passages if p.id not in held]
    chat = chat_examples(train_passages, seed)
    ground = grounding_examples(train_passages, seed) + copy_drills(pretrain, seed)
    random.Random(f"{seed}:mix").shuffle(ground)
    lookup = lookup_drills(train_passages, seed)
    return passages, held, pretrain, chat, ground, lookup


def chunk_text(text: str, limit: int) -> list[str]:
    out, cur, n = [], [], 0
    for para in text.split("\n\n"):
        if cur and n + len(para) > limit:
            out.append("\n\n".join(cur))
            cur, n = [], 0
        cur.append(para)
        n += len(para) + 2
    if cur:
        out.append("\n\n".join(cur))
    return [c.strip() for c in out if len(c.strip()) > 40]


def group_by_source(passages: list[rst.Passage]) -> dict[str, list[rst.Passage]]:
    by_source: dict[str, list[rst.Passage]] = {}
    for p in passages:
        by_source.setdefault(p.source, []).append(p)
    return by_source


def answer_in_context(p: rst.Passage) -> bool:
    """Whether the passage, as trimmed for a prompt, still holds its answer (whitespace aside)."""
    return answer_for(p)[:60] in " ".join(as_context(p)["text"].split())


def chat_examples(passages: list[rst.Passage], seed: int) -> list[dict]:
    usable = [p for p in passages if len(answer_for(p)) >= 25]
    by_source = group_by_source(usable)
    out = []
    for p in usable:
        rng = random.Random(f"{seed}:{p.id}")
        question = rng.choice(questions_for(p, rng))
        content = question
        # Context only where the gold passage, as trimmed for the prompt, holds the answer.
        if rng.random() < CONTEXT_SHARE and answer_in_context(p):
            ctx = [p] + distractors(p, usable, by_source, rng, rng.choice([0, 1, 1, 2, 2]))
            rng.shuffle(ctx)
            content = with_context(question, [as_context(c) for c in ctx])
        messages = [{"role": "user", "content": content},
                    {"role": "assistant", "content": answer_for(p)}]
        if rng.random() < FOLLOW_UP_SHARE:
            siblings = [q for q in by_source[p.source] if q.id != p.id]
            if siblings:
                q = rng.choice(siblings)
                messages += [{"role": "user", "content": rng.choice(questions_for(q, rng))},
                             {"role": "assistant", "content": answer_for(q)}]
        out.append({"messages": messages})
    out += greetings()
    random.Random(seed).shuffle(out)
    return out


def grounding_examples(passages: list[rst.Passage], seed: int) -> list[dict]:
    """Drills for the last training stage: every example carries passages and its answer is copied
    out of one of them. A model of this size trained on ~10 M tokens has not yet learnt to copy
    from its context at all (its reply loss on the chat data was the same with and without the
    passages), so these make copying the only way to a low loss:
    - quote: "What does passage [2] say?" (the passage is named by its number: copying alone);
    - single: a question with its gold passage only (what `kaki eval --with-context` asks);
    - pick: a question with the gold passage among one or two distractors (what retrieval gives).
    The answer is always the entry's first sentences, as in the chat data."""
    usable = [p for p in passages if len(answer_for(p)) >= 25 and answer_in_context(p)]
    by_source = group_by_source(usable)
    out = []
    for p in usable:
        rng = random.Random(f"{seed}:ground:{p.id}")
        kind = rng.choices(("quote", "single", "pick"), weights=(4, 3, 3))[0]
        if kind == "single":
            ctx, question = [p], rng.choice(questions_for(p, rng))
        else:
            ctx = [p] + distractors(p, usable, by_source, rng, rng.choice([1, 2] if kind == "pick" else [0, 1, 2]))
            rng.shuffle(ctx)
            question = (rng.choice(QUOTE_QUESTIONS).format(n=ctx.index(p) + 1) if kind == "quote"
                        else rng.choice(questions_for(p, rng)))
        out.append({"messages": [{"role": "user", "content": with_context(question, [as_context(c) for c in ctx])},
                                 {"role": "assistant", "content": answer_for(p)}]})
    random.Random(f"{seed}:ground").shuffle(out)
    return out


def copy_drills(pretrain: list[dict], seed: int, n: int = 12000) -> list[dict]:
    """Plain-text records in which a stretch of the docs appears twice. Predicting the second copy
    is easy only by looking back at the first, which is how a transformer learns to copy from its
    context at all (induction heads); on ordinary text, at kaki-tiny's size and token budget, that
    never happened. The grounding drills then build on it."""
    rng = random.Random(f"{seed}:copy")
    texts = [r["text"] for r in pretrain if len(r["text"]) > 400]
    out = []
    for _ in range(n):
        text = rng.choice(texts)
        size = rng.randint(200, 700)
        start = rng.randrange(0, max(1, len(text) - size))
        span = text[start:start + size].strip()
        out.append({"text": f"{span}\n\n{span}"})
    return out


# ----------------------------------------------------------------------------- lookup drills

# First words of an entry's first sentence that are not an imperative verb ("Return ...").
NOT_VERBS = {"this", "the", "a", "an", "if", "like", "similar", "same", "when", "for", "is", "in",
             "on", "note", "see", "alias", "deprecated", "new", "changed", "whether", "true", "false",
             "all", "any", "only", "both", "these", "each", "one", "some", "no", "not", "called", "convenience",
             "instances", "default", "equivalent", "used", "it", "as", "by", "with", "from", "at"}
CALLABLES = {"function", "coroutinefunction", "decorator", "method", "classmethod", "staticmethod",
             "coroutinemethod", "abstractmethod"}
LOOKUP_KINDS = CALLABLES | {"class", "exception", "data", "attribute", "term"}
LOOKUP_TEMPLATES = ("Which {what} {vp}?", "What {what} {vp}?", "Is there a {what} that {vp}?",
                    "I need the {what} that {vp}. Which one is it?", "Tell me the {what} that {vp}.")
TERM_TEMPLATES = ("What is the term for {np}?", "What do you call {np}?", "What is {np} called?")


def third_person(verb: str) -> str:
    """The imperative of a doc sentence ("Return", "Apply") as the verb of "which function ...s"."""
    v = verb.lower()
    if v.endswith("s") and not v.endswith("ss"):
        return v  # already "Returns", "Checks"
    if v.endswith(("ss", "sh", "ch", "x", "z", "o")):
        return v + "es"
    if v.endswith("y") and v[-2:-1] not in ("a", "e", "i", "o", "u"):
        return v[:-1] + "ies"
    return v + "s"


def _lower_first(text: str) -> str:
    """"The X" -> "the X", but "SSLContext ..." and "True ..." stay as written (names)."""
    word = text.split(" ", 1)[0]
    return text[0].lower() + text[1:] if word.istitle() and word.isalpha() else text


def lookup_question(p: rst.Passage, rng: random.Random) -> str | None:
    """The reverse of questions_for: the entry's description, asked for its name ("Which function
    returns the geometric mean of data?"), the question a user asks when the name is what they
    lack. None where the first sentence does not turn into one."""
    first = sentences(p.first_paragraph)[:1]
    if not first or p.kind not in LOOKUP_KINDS:
        return None
    s = first[0].rstrip(".:;")
    if not 20 <= len(s) <= 160 or "`" in s or s.lower().startswith(("this is", "see ")):
        return None
    head, _, rest = s.partition(" ")
    if p.kind == "term":
        if head.lower() not in ("a", "an", "the") or not rest:
            return None
        return rng.choice(TERM_TEMPLATES).format(np=_lower_first(s))
    if p.kind in CALLABLES:
        owner = p.title.rsplit(".", 1)[0] if p.kind not in ("function", "coroutinefunction", "decorator") else ""
        what = f"method of {_short(owner)}" if owner else "function"
        if head.lower() == "this" and rest.startswith(("function ", "method ")):
            vp = rest.split(" ", 1)[1]
        elif head.isalpha() and head.istitle() and head.lower() not in NOT_VERBS and rest:
            vp = f"{third_person(head)} {rest}"
        else:
            return None
        return rng.choice(LOOKUP_TEMPLATES).format(what=what, vp=vp)
    if p.kind == "exception":
        if head == "Raised" and rest:
            return rng.choice(("Which exception is raised {r}?", "What exception do I get {r}?")).format(r=rest)
        what = "exception"
    else:
        what = "class" if p.kind == "class" else "attribute"
    if head.lower() in ("a", "an", "the") and rest:
        return rng.choice((f"Which {what} is {{np}}?", f"What is the name of the {what} that is {{np}}?")).format(
            np=_lower_first(s))
    return None


def lookup_answer(p: rst.Passage) -> str:
    """The name first (copied from the passage's title line), then the description."""
    name = f"{p.title}()" if p.kind in CALLABLES else p.title
    return f"{name}: {answer_for(p)}"


def lookup_drills(passages: list[rst.Passage], seed: int) -> list[dict]:
    """"Which function does X?" questions answered with the entry's name and first sentences, for a
    last training stage. The chat data and the grounding drills only ever ask from the name to the
    description ("What does os.fsync() do?"), so the model never learnt to answer with a name, the
    thing users most often ask the docs for. Like the grounding drills, most carry the answering
    passage (45% alone, 40% among one or two distractors); 15% carry none, so a question without
    retrieval is still answered."""
    usable = [p for p in passages if len(answer_for(p)) >= 25 and answer_in_context(p)]
    by_source = group_by_source(usable)
    out = []
    for p in usable:
        rng = random.Random(f"{seed}:lookup:{p.id}")
        question = lookup_question(p, rng)
        if question is None:
            continue
        kind = rng.choices(("single", "pick", "none"), weights=(45, 40, 15))[0]
        ctx = [] if kind == "none" else [p] + distractors(p, usable, by_source, rng, rng.choice([1, 2]) if kind == "pick" else 0)
        rng.shuffle(ctx)
        out.append({"messages": [{"role": "user", "content": with_context(question, [as_context(c) for c in ctx])},
                                 {"role": "assistant", "content": lookup_answer(p)}]})
    random.Random(f"{seed}:lookup").shuffle(out)
    return out


QUOTE_QUESTIONS = ("What does passage [{n}] say?", "Summarize passage [{n}].",
                   "What is passage [{n}] about?", "Quote the start of passage [{n}].")


def distractors(p, usable, by_source, rng, k: int) -> list[rst.Passage]:
    """One from the same page when there is one (hard: same topic), the rest from anywhere."""
    picked: list[rst.Passage] = []
    same = [q for q in by_source[p.source] if q.id != p.id]
    if k and same:
        picked.append(rng.choice(same))
    while len(picked) < k:
        q = rng.choice(usable)
        if q.id != p.id and q not in picked:
            picked.append(q)
    return picked


GREETINGS = [
    ("Hello!", "Hello! I am kaki-tiny, a small assistant trained on the Python documentation. "
               "Ask me about a Python module, function or concept."),
    ("Who are you?", "I am kaki-tiny, a very small language model trained on the Python 3.11 "
                     "documentation. I can answer short questions about Python, best when "
                     "relevant documentation passages are given to me."),
    ("What can you do?", "I answer questions about the Python standard library and language, "
                         "using the Python documentation I was trained on. With retrieved "
                         "passages in the prompt my answers are much more reliable."),
    ("Thanks!", "You're welcome. Ask me anything else about Python."),
]


def greetings() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in GREETINGS for _ in range(5)]


# ----------------------------------------------------------------------------- output

def write_jsonl(path: Path, records) -> None:
    """Atomically: a half-written file is never left under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
    os.replace(tmp, path)


def passage_record(p: rst.Passage, held: bool | None = None) -> dict:
    rec = {"id": p.id, "title": context_title(p), "source": p.source, "text": trim_passage(p.text),
           "url": doc_url(p.id, p.source)}
    if held is not None:
        rec["held_out"] = held
    return rec


def check_questions(eval_out: Path, held_ids: set[str]) -> None:
    qpath = eval_out / "questions.jsonl"
    if not qpath.is_file():
        return
    for n, line in enumerate(qpath.read_text().splitlines(), 1):
        if line.strip():
            pid = json.loads(line)["passage_id"]
            if pid not in held_ids:
                raise SystemExit(f"{qpath}:{n}: passage_id {pid!r} is not a held-out passage")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", required=True, type=Path, help="folder of the docs' reST sources")
    ap.add_argument("--out", required=True, type=Path, help="work folder for the JSONL files")
    ap.add_argument("--eval-out", type=Path, help="also write the held-out passages here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    sources = read_sources(args.src)
    passages, held, pretrain, chat, ground, lookup = build(sources, args.seed)
    out = args.out
    write_jsonl(out / "pretrain.jsonl", pretrain)
    write_jsonl(out / "chat.jsonl", chat)
    write_jsonl(out / "ground.jsonl", ground)
    write_jsonl(out / "lookup.jsonl", lookup)
    write_jsonl(out / "passages.jsonl", (passage_record(p, p.id in held) for p in passages))
    held_passages = [p for p in passages if p.id in held]
    if args.eval_out:
        write_jsonl(args.eval_out / "passages.jsonl", (passage_record(p) for p in held_passages))
        check_questions(args.eval_out, held)
    stats = {
        "source_files": len(sources), "passages": len(passages), "held_out": len(held),
        "pretrain_records": len(pretrain), "pretrain_chars": sum(len(r["text"]) for r in pretrain),
        "chat_records": len(chat),
        "chat_chars": sum(len(m["content"]) for r in chat for m in r["messages"]),
        "chat_with_context": sum("Context:\n[1] " in r["messages"][0]["content"] for r in chat),
        "ground_records": len(ground),
        "lookup_records": len(lookup),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
