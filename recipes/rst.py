"""Just enough reStructuredText for the Python documentation sources: explicit markup (directives,
targets, comments) parsed into a tree, readable text rendered from it, and the doc entries
(`.. function::`, `.. class::`, ...), section openings and glossary terms found in it.

Not a reST implementation: inline markup is stripped with regular expressions, tables and lists are
kept as their source lines. Cheap and good enough for training text and passages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Directives that document one object: each becomes a passage of its own.
ENTRY_KINDS = {
    "function", "class", "method", "data", "attribute", "exception", "classmethod", "staticmethod",
    "decorator", "decoratormethod", "coroutinefunction", "coroutinemethod", "abstractmethod",
    "opcode", "envvar", "cmdoption", "describe", "pdbcommand", "c:function", "c:macro", "c:type",
    "c:member", "c:var",
}
# Entry kinds whose names take members (`Counter` -> `Counter.most_common`).
CONTAINER_KINDS = {"class", "exception", "c:type"}
# Directives dropped with their bodies: build machinery, not prose.
DROP = {"index", "highlight", "sectionauthor", "moduleauthor", "toctree", "testsetup", "testcleanup",
        "tabularcolumns", "include", "literalinclude", "image", "figure", "contents", "audit-event",
        "raw", "module", "currentmodule", "program", "sidebar", "productionlist", "only", "toctree",
        "c:namespace", "c:namespace-push", "c:namespace-pop", "default-role", "role", "ifconfig",
        "limited-api-list", "opcode-ref", "miscnews"}
CODE = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "parsed-literal"}
ADMONITIONS = {"note": "Note", "warning": "Warning", "important": "Important", "caution": "Caution",
               "tip": "Tip", "hint": "Hint", "attention": "Attention", "danger": "Danger",
               "seealso": "See also", "impl-detail": "CPython implementation detail",
               "availability": "Availability", "admonition": ""}

_EXPLICIT = re.compile(r"^(\s*)\.\.(?:\s+(.*))?$")
_DIRECTIVE = re.compile(r"^([\w:-]+)::\s*(.*)$")
_ADORNMENT = re.compile(r"^([=\-~^\"*#+'`:.])\1{2,}\s*$")


@dataclass
class Directive:
    name: str
    args: list[str]  # the argument line and its continuation lines (signatures, for entries)
    options: dict
    body: list[str]  # dedented content lines
    indent: int
    start: int  # line number in the file (for stable ids)


@dataclass
class Line:
    text: str
    start: int


def indent_of(s: str) -> int:
    return len(s) - len(s.lstrip(" "))


def dedent(lines: list[str]) -> list[str]:
    k = min((indent_of(s) for s in lines if s.strip()), default=0)
    return [s[k:] if s.strip() else "" for s in lines]


def parse(lines: list[str], offset: int = 0) -> list:
    """Items of a block: Line, or Directive for explicit markup (`.. name:: args`); targets,
    substitution definitions, footnotes and comments are dropped with their bodies."""
    items: list = []
    i = 0
    while i < len(lines):
        m = _EXPLICIT.match(lines[i])
        if not m:
            items.append(Line(lines[i], offset + i))
            i += 1
            continue
        k = len(m.group(1))
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or indent_of(lines[j]) > k):
            j += 1
        block = lines[i + 1:j]
        while block and not block[-1].strip():
            block.pop()
        d = _DIRECTIVE.match(m.group(2) or "")
        if d:
            head, rest = [], block
            # Lines right after the directive (before a blank line) continue its arguments or
            # give options; the content starts after the first blank line.
            while rest and rest[0].strip():
                head.append(rest[0])
                rest = rest[1:]
            args = [d.group(2)] if d.group(2) else []
            options = {}
            for h in dedent(head) if head else []:
                om = re.match(r"^:([\w-]+):\s*(.*)$", h)
                if om and not args[-1:] == [""] and h.startswith(":"):
                    options[om.group(1)] = om.group(2)
                else:
                    args.append(h)
            items.append(Directive(d.group(1).removeprefix("py:"), _join_backslashes(args), options,
                                   dedent(rest), k, offset + i))
        i = j
    return items


def _join_backslashes(args: list[str]) -> list[str]:
    out: list[str] = []
    for a in args:
        if out and out[-1].endswith("\\"):
            out[-1] = out[-1][:-1].rstrip() + " " + a.strip()
        else:
            out.append(a.strip())
    return [a for a in out if a]


# ----------------------------------------------------------------------------- inline markup

_ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`((?:[^`\\]|\\.)+)`")


def _role(m: re.Match) -> str:
    role, text = m.group(1), re.sub(r"\\(.)", r"\1", m.group(2))
    explicit = re.match(r"^(.*?)\s*<([^<>]+)>$", text, re.S)
    if explicit and explicit.group(1):
        return explicit.group(1)
    if explicit:
        text = explicit.group(2)
    text = text.lstrip("!")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    if role == "pep":
        return f"PEP {text}"
    if role == "rfc":
        return f"RFC {text}"
    if role in ("issue",):
        return f"bpo-{text}"
    if role == "gh":
        return f"gh-{text}"
    if role in ("func", "meth") and not text.endswith(")"):
        return f"{text}()"
    return text


_LITERAL = re.compile(r"``(.+?)``")


def inline(s: str) -> str:
    # Roles and ``literals`` first, set aside so that `*` inside them (`*args`, `*/*.gif`) is not
    # taken for emphasis; they come back at the end.
    kept: list[str] = []

    def keep(text: str) -> str:
        kept.append(text)
        return f"\x00{len(kept) - 1}\x00"

    s = _ROLE.sub(lambda m: keep(_role(m)), s)
    s = _LITERAL.sub(lambda m: keep(m.group(1)), s)
    s = re.sub(r"`([^`<]+?)\s*<[^`>]+>`__?", r"\1", s)  # `text <url>`_
    s = re.sub(r"`([^`]+)`__?", r"\1", s)  # `reference`_
    s = re.sub(r"`([^`]+)`", r"\1", s)  # default role
    s = re.sub(r"\s*\[#?[\w-]*\]_", "", s)  # footnote references
    s = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])", r"\1", s)
    s = s.replace("|nbsp|", " ").replace("\\ ", "")
    s = re.sub(r"\|(\w[\w ]*)\|_?", r"\1", s)
    s = re.sub(r"\\([*_`|\\])", r"\1", s)
    s = re.sub(r"(\S)::$", r"\1:", s)
    s = re.sub(r"\s+::$", "", s)
    return re.sub(r"\x00(\d+)\x00", lambda m: kept[int(m.group(1))], s)


# ----------------------------------------------------------------------------- rendering

@dataclass
class Passage:
    """A doc entry, a section's opening, or a glossary term, with the lines it owns in its file."""
    id: str
    kind: str
    title: str  # qualified name, section title or term
    source: str  # file, e.g. "library/json"
    text: str
    signature: str = ""
    first_paragraph: str = ""
    section: str = ""
    module: str = ""


@dataclass
class Context:
    source: str
    module: str = ""
    cls: str = ""
    section: str = ""
    doc_title: str = ""
    classes: set = field(default_factory=set)  # short names of the classes documented so far
    ids: dict = field(default_factory=dict)

    def new_id(self, key: str) -> str:
        n = self.ids.get(key, 0)
        self.ids[key] = n + 1
        return key if n == 0 else f"{key}~{n}"


def entry_name(kind: str, sig: str, ctx: Context) -> str:
    """The qualified name of an entry from its first signature: `dumps(obj)` in module json ->
    `json.dumps`; `most_common([n])` in class Counter -> `collections.Counter.most_common`."""
    sig = sig.strip()
    if kind.startswith("c:"):
        # `PyObject* PyObject_Type(PyObject *o)`, `PyObject* PyObject._ob_next`: the last name
        # before the argument list.
        names = re.findall(r"[A-Za-z_][\w.]*", sig.split("(")[0])
        return names[-1] if names else sig
    if kind in ("opcode", "envvar", "cmdoption", "describe", "pdbcommand"):
        return sig.split("(")[0].strip()
    name = re.split(r"[\s(\[=:]", sig, 1)[0].lstrip("*")
    if not name:
        return sig
    if kind in ("method", "attribute", "classmethod", "staticmethod", "coroutinemethod",
                "abstractmethod") and not ctx.cls and ctx.module and name.split(".")[0] in ctx.classes:
        # `.. method:: datetime.date()` after `.. class:: datetime`, outside the class body.
        return f"{ctx.module}.{name}"
    if ctx.cls and not name.startswith(ctx.cls + "."):
        outer, _, short_cls = ctx.cls.rpartition(".")
        if name.startswith(short_cls + "."):  # `.. method:: Popen.poll()` inside Popen
            return f"{outer}.{name}" if outer else name
        return f"{ctx.cls}.{name}"
    if ctx.module and not name.startswith(ctx.module + "."):
        return f"{ctx.module}.{name}"
    return name


def paragraphs(lines: list[str]) -> list[str]:
    """Rendered lines grouped into paragraphs (blank-line separated)."""
    out, cur = [], []
    for s in lines:
        if s.strip():
            cur.append(s)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return out


def _looks_tabular(p: str) -> bool:
    """Rows of a table: column gaps (two or more spaces not after a sentence end) on most lines."""
    lines = p.splitlines()
    gaps = sum(bool(re.search(r"[^.?!:\s] {2,}\S", ln)) for ln in lines)
    return p.startswith(("+", "|")) or gaps * 2 > len(lines)


def first_prose_paragraph(lines: list[str]) -> str:
    for p in paragraphs(lines):
        if p.startswith((" ", ">>>", "Note:", "New in version", "Changed in version", "Availability")):
            continue
        if _looks_tabular(p):
            continue
        if len(p) >= 20:
            return " ".join(p.split())
    return ""


class Renderer:
    """Renders a file's items to text, collecting passages; items of passages in `skip` are left out
    (held-out entries never reach the training text)."""

    def __init__(self, source: str, skip: set[str] = frozenset()):
        self.ctx = Context(source)
        self.skip = skip
        self.passages: list[Passage] = []

    def render(self, items: list, top: bool = False) -> list[str]:
        out: list[str] = []
        i = 0
        while i < len(items):
            it = items[i]
            if isinstance(it, Line):
                if top and self._is_overlined_title(items, i):
                    j, lines = self._section(items, i + 1, body_start=i + 3)
                    out.extend(lines)
                    i = j
                    continue
                if top and self._is_title(items, i):
                    j, lines = self._section(items, i, body_start=i + 2)
                    out.extend(lines)
                    i = j
                    continue
                if _ADORNMENT.match(it.text.strip()) or re.match(r"^\s*[+|]?[-=+]{3,}[-=+ ]*$", it.text):
                    if not it.text.strip().startswith("|"):
                        i += 1
                        continue
                out.append(inline(it.text.rstrip()))
            else:
                out.extend(self.directive(it))
            i += 1
        return out

    def _is_title(self, items: list, i: int) -> bool:
        it = items[i]
        if not it.text.strip() or it.text.startswith(" ") or i + 1 >= len(items):
            return False
        nxt = items[i + 1]
        return (isinstance(nxt, Line) and bool(_ADORNMENT.match(nxt.text))
                and len(nxt.text.strip()) >= len(it.text.strip()) - 1 and not _ADORNMENT.match(it.text))

    def _is_overlined_title(self, items: list, i: int) -> bool:
        """`****` / `  What's New In Python 3.6` / `****`: the title may be indented."""
        if i + 2 >= len(items) or not all(isinstance(items[k], Line) for k in (i, i + 1, i + 2)):
            return False
        if items[i].text.startswith(" ") or items[i + 2].text.startswith(" "):
            return False
        over, text, under = (items[k].text.strip() for k in (i, i + 1, i + 2))
        return bool(_ADORNMENT.match(over) and text and not _ADORNMENT.match(text)
                    and _ADORNMENT.match(under) and over[0] == under[0])

    def _section(self, items: list, i: int, body_start: int) -> tuple[int, list[str]]:
        """A section title and its opening (up to the first directive or sub-section): one
        passage. Returns where the opening ends and its rendered lines (empty when held out)."""
        title = inline(items[i].text.strip())
        self.ctx.section = title
        if not self.ctx.doc_title:
            self.ctx.doc_title = _title_text(title)
        shown = _title_text(title)
        if shown != self.ctx.doc_title:
            shown = f"{self.ctx.doc_title}: {shown}"
        j = body_start
        while j < len(items):
            it = items[j]
            if isinstance(it, Directive) and (it.name in ENTRY_KINDS or it.name == "glossary"):
                break
            if isinstance(it, Line) and (self._is_title(items, j) or self._is_overlined_title(items, j)):
                break
            if isinstance(it, Line) and _ADORNMENT.match(it.text) and j + 1 < len(items) \
                    and self._is_title(items, j + 1):
                break  # an overline starts the next section
            j += 1
        body_items = items[body_start:j]
        # module directives inside the opening set the context for the entries that follow
        for it in body_items:
            if isinstance(it, Directive) and it.name in ("module", "currentmodule") and it.args:
                self.ctx.module = "" if it.args[0].strip() == "None" else it.args[0].strip()
                self.ctx.cls = ""
        pid = self.ctx.new_id(f"{self.ctx.source}#{_slug(title)}")
        body = self.render(body_items)
        keep = _trim_paragraphs(paragraphs(body), 1200)
        if keep:
            self.passages.append(Passage(pid, "section", shown, self.ctx.source, keep,
                                         first_paragraph=first_prose_paragraph(body),
                                         section=title, module=self.ctx.module))
        if pid in self.skip:
            return j, []  # held out: the passage is recorded (for the eval set), its text left out
        return j, [title, "", *body] if "\n".join(body).strip() else [title, ""]

    def directive(self, d: Directive) -> list[str]:
        pad = " " * d.indent
        name, arg = d.name, " ".join(d.args)
        if name in ("module", "currentmodule"):
            if d.args:
                self.ctx.module = "" if d.args[0].strip() == "None" else d.args[0].strip()
                self.ctx.cls = ""
            return []
        if name in DROP:
            return []
        if name in ENTRY_KINDS:
            return self.entry(d)
        if name == "glossary":
            return self.glossary(d)
        body = self.render(parse(d.body, d.start + 1))
        if name in CODE:
            return [""] + [pad + "    " + s if s else "" for s in d.body] + [""]
        if name == "versionadded":
            head = f"New in version {d.args[0]}." if d.args else "New."
            return [pad + head + (" " + _flat(body, d.args[1:]) if body or d.args[1:] else "")]
        if name == "versionchanged":
            v = d.args[0] if d.args else ""
            return [pad + f"Changed in version {v}: " + _flat(body, d.args[1:])]
        if name in ("deprecated", "deprecated-removed"):
            vs = d.args[0].split() if d.args else []
            head = f"Deprecated since version {vs[0]}" if vs else "Deprecated"
            if name == "deprecated-removed" and len(vs) > 1:
                head += f", will be removed in version {vs[1]}"
            return [pad + head + ": " + _flat(body, d.args[1:])]
        if name in ADMONITIONS:
            label = ADMONITIONS[name] or (inline(d.args[0]) if d.args else "Note")
            extra = d.args if name != "admonition" else d.args[1:]
            text = _flat([], extra)
            lines = [pad + f"{label}: " + text] if text else [pad + f"{label}:"]
            return lines + [pad + s if s else "" for s in body]
        if name == "rubric":
            return [pad + inline(arg), ""]
        if name in ("topic", "list-table", "table", "centered", "epigraph", "container", "compound"):
            return ([pad + inline(arg)] if arg else []) + [pad + s if s else "" for s in body]
        # Anything else: keep its content.
        return [pad + s if s else "" for s in body]

    def entry(self, d: Directive) -> list[str]:
        sigs = d.args or [""]
        name = entry_name(d.name, sigs[0], self.ctx)
        key = f"{self.ctx.source}:{name}"
        pid = self.ctx.new_id(key)
        outer_cls = self.ctx.cls
        qual_sigs = [_qualify_sig(s, entry_name(d.name, s, self.ctx), d.name) for s in sigs]
        if d.name in CONTAINER_KINDS:
            self.ctx.cls = name
            self.ctx.classes.add(name.rsplit(".", 1)[-1])
        items = parse(d.body, d.start + 1)
        own = [it for it in items if not (isinstance(it, Directive) and it.name in ENTRY_KINDS)]
        nested = [it for it in items if isinstance(it, Directive) and it.name in ENTRY_KINDS]
        # The entry's own text: its content without nested entries (those are passages too).
        own_lines = self.render(own)
        held = pid in self.skip
        # Held out: its own text is left out; nested entries (rendered with the skip set) stay.
        body = self.render(nested if held else items)
        self.ctx.cls = outer_cls
        own_text = "\n".join(qual_sigs + [""] + own_lines).strip()
        self.passages.append(Passage(pid, d.name, name, self.ctx.source,
                                     _trim_paragraphs(paragraphs(own_text.splitlines()), 1500),
                                     signature=qual_sigs[0], first_paragraph=first_prose_paragraph(own_lines),
                                     section=self.ctx.section, module=self.ctx.module))
        if held:
            return body
        return [""] + qual_sigs + [""] + ["   " + s if s else "" for s in body] + [""]

    def glossary(self, d: Directive) -> list[str]:
        out = []
        lines = d.body
        i = 0
        while i < len(lines):
            if lines[i].strip() and not lines[i].startswith(" "):
                term = inline(lines[i].strip())
                j = i + 1
                while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
                    j += 1
                body = self.render(parse(dedent(lines[i + 1:j]), d.start + 1 + i))
                pid = self.ctx.new_id(f"{self.ctx.source}:term:{term}")
                self.passages.append(Passage(pid, "term", term, self.ctx.source,
                                             f"{term}\n" + _trim_paragraphs(paragraphs(body), 1500),
                                             first_paragraph=first_prose_paragraph(body), section="Glossary"))
                if pid not in self.skip:
                    out += [term] + ["   " + s if s else "" for s in body] + [""]
                i = j
            else:
                i += 1
        return out


def _qualify_sig(sig: str, name: str, kind: str) -> str:
    if kind.startswith("c:") or kind in ("opcode", "envvar", "cmdoption", "describe", "pdbcommand"):
        return inline(sig)
    short = re.split(r"[\s(\[=:]", sig.strip(), 1)[0]
    return inline(name + sig.strip()[len(short):])


def _flat(body: list[str], extra: list[str]) -> str:
    return " ".join(" ".join(inline(x) for x in extra).split() + " ".join(body).split())


def _trim_paragraphs(paras: list[str], limit: int) -> str:
    """Whole paragraphs up to about `limit` characters (at least one)."""
    out, n = [], 0
    for p in paras:
        if out and n + len(p) > limit:
            break
        out.append(p)
        n += len(p)
    return "\n\n".join(out).strip()


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _title_text(title: str) -> str:
    """`json --- JSON encoder and decoder` -> `json: JSON encoder and decoder`."""
    return title.replace(" --- ", ": ")


_CROSS_LINE = [(_ROLE, _role), (re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?"), r"\1"),
               (re.compile(r"``([^`]+?)``"), r"\1")]


def finish_inline(text: str) -> str:
    """Inline markup that spans lines (rendering works line by line)."""
    for rx, rep in _CROSS_LINE:
        text = rx.sub(rep, text)
    return text


def render_file(text: str, source: str, skip: set[str] = frozenset()) -> tuple[str, list[Passage]]:
    """A file's readable text (held-out passages left out) and all of its passages."""
    lines = text.expandtabs(8).splitlines()
    r = Renderer(source, skip)
    out = r.render(parse(lines), top=True)
    cleaned: list[str] = []
    for s in out:
        s = s.rstrip()
        if not s and cleaned and not cleaned[-1]:
            continue
        cleaned.append(s)
    for p in r.passages:
        p.text = finish_inline(p.text)
        p.first_paragraph = " ".join(finish_inline(p.first_paragraph).split())
    return finish_inline("\n".join(cleaned).strip()) + "\n", r.passages
