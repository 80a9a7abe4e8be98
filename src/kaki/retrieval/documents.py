"""Readers: files and folders -> documents of titled sections, with the source line of each paragraph.

Supported: plain text (.txt and any explicitly named file), Markdown (.md, .markdown),
reStructuredText (.rst, .rest, .rst.txt, as in Sphinx's `_sources`), HTML (.html, .htm: text
extracted, scripts and styles dropped) and JSONL (.jsonl: one document per record with a `text`
field, optional `title`, `url` and `id`). Folders are read recursively (hidden entries skipped,
other extensions ignored).

Markup is lightly removed (heading underlines, directive markers, roles, link targets) so that
BM25 and the embedder see the words a reader sees; headings split a file into sections, and a
passage's title names its file and section.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

from kaki.errors import KakiError

TEXT_EXT = (".txt",)
MARKDOWN_EXT = (".md", ".markdown")
RST_EXT = (".rst", ".rest", ".rst.txt")
HTML_EXT = (".html", ".htm")
JSONL_EXT = (".jsonl",)
KINDS = {**{e: "rst" for e in RST_EXT}, **{e: "text" for e in TEXT_EXT}, **{e: "markdown" for e in MARKDOWN_EXT},
         **{e: "html" for e in HTML_EXT}, **{e: "jsonl" for e in JSONL_EXT}}


@dataclass
class Section:
    """A titled stretch of a document. `lines` maps character offsets in `text` (where a
    paragraph starts) to 1-based source lines (or JSONL record numbers)."""

    title: str
    text: str
    lines: list[tuple[int, int]] = field(default_factory=list)

    def line_at(self, offset: int) -> int:
        line = self.lines[0][1] if self.lines else 1
        for at, n in self.lines:
            if at > offset:
                break
            line = n
        return line


@dataclass
class Document:
    """One unit of a source file: the whole file, or one JSONL record (`ref` = its id)."""

    title: str
    sections: list[Section]
    ref: str = ""
    url: str = ""


def kind_of(path: Path) -> str | None:
    name = path.name.lower()
    for ext in sorted(KINDS, key=len, reverse=True):
        if name.endswith(ext):
            return KINDS[ext]
    return None


def find_files(paths: list[str | Path]) -> list[Path]:
    """The files to index under `paths` (resolved, sorted, unique). Named files are read whatever
    their extension (as text when unknown); folders contribute their supported files."""
    out: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            out.add(p.resolve())
        elif p.is_dir():
            for f in p.rglob("*"):
                rel = f.relative_to(p).parts
                if f.is_file() and not any(part.startswith(".") for part in rel) and kind_of(f):
                    out.add(f.resolve())
        else:
            raise KakiError(f"{p} does not exist; give files or folders to index")
    return sorted(out)


def read_documents(path: Path) -> list[Document]:
    """The documents of one file."""
    try:
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise KakiError(f"cannot read {path}: {e}")
    kind = kind_of(path) or "text"
    if kind == "jsonl":
        return list(read_jsonl(raw, path))
    title, sections = {"text": read_text, "markdown": read_markdown, "rst": read_rst,
                       "html": read_html}[kind](raw)
    title = title or _stem(path)
    sections = [s for s in sections if s.text.strip()]
    return [Document(title=title, sections=sections)] if sections else []


def _stem(path: Path) -> str:
    name = path.name
    for ext in sorted(KINDS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


# ----------------------------------------------------------------------------- paragraphs


def _sections_from_blocks(blocks: list[tuple[str | None, str, int]]) -> list[Section]:
    """Blocks (heading or None, paragraph text, line) -> sections: a heading starts a new one."""
    sections: list[Section] = []
    cur = Section(title="", text="")
    for heading, para, line in blocks:
        if heading is not None:
            if cur.text.strip():
                sections.append(cur)
            cur = Section(title=heading, text="")
            continue
        para = para.strip("\n")
        if not para.strip():
            continue
        if cur.text:
            cur.text += "\n\n"
        cur.lines.append((len(cur.text), line))
        cur.text += para
    if cur.text.strip():
        sections.append(cur)
    return sections


def _paragraphs(lines: list[str], first_line: int = 1) -> Iterator[tuple[str, int]]:
    """Blank-line separated paragraphs of `lines`, dedented, with their first line number."""
    buf: list[str] = []
    start = first_line
    for i, ln in enumerate(lines, first_line):
        if ln.strip():
            if not buf:
                start = i
            buf.append(ln.rstrip())
        elif buf:
            yield textwrap.dedent("\n".join(buf)), start
            buf = []
    if buf:
        yield textwrap.dedent("\n".join(buf)), start


def read_text(raw: str) -> tuple[str | None, list[Section]]:
    return None, _sections_from_blocks([(None, p, n) for p, n in _paragraphs(raw.splitlines())])


# ----------------------------------------------------------------------------- Markdown

_MD_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_SETEXT = re.compile(r"^ {0,3}(=+|-+)\s*$")
_MD_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_MD_REFDEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s+\S+.*$")
_MD_TAG = re.compile(r"</?[A-Za-z][^>]*>")


def _md_inline(s: str) -> str:
    s = _MD_IMAGE.sub(r"\1", s)
    s = _MD_LINK.sub(r"\1", s)
    s = _MD_TAG.sub("", s)
    return s.replace("**", "").replace("__", "").replace("`", "")


# YAML front matter (Jekyll, Hugo, MkDocs): metadata between two `---` lines at the top, not prose.
_MD_FRONT_OPEN = re.compile(r"^---\s*$")
_MD_FRONT_CLOSE = re.compile(r"^(---|\.\.\.)\s*$")
_MD_FRONT_TITLE = re.compile(r"""^title:\s*["']?(.*?)["']?\s*$""")
MAX_FRONT_MATTER_LINES = 200


def _front_matter(lines: list[str]) -> tuple[int, str | None]:
    """(lines it spans, its `title:` if any); (0, None) when the file has none."""
    if not lines or not _MD_FRONT_OPEN.match(lines[0]):
        return 0, None
    for end in range(1, min(len(lines), MAX_FRONT_MATTER_LINES)):
        if _MD_FRONT_CLOSE.match(lines[end]):
            title = next((m.group(1) for ln in lines[1:end] if (m := _MD_FRONT_TITLE.match(ln))), None)
            return end + 1, title or None
    return 0, None  # no closing line: a thematic break, not front matter


def read_markdown(raw: str) -> tuple[str | None, list[Section]]:
    lines = raw.splitlines()
    blocks: list[tuple[str | None, str, int]] = []
    skip, title = _front_matter(lines)
    body: list[str] = []
    body_start = 1
    in_fence = False

    def flush():
        nonlocal body
        for p, n in _paragraphs(body, body_start):
            blocks.append((None, p, n))
        body = []

    i = skip
    while i < len(lines):
        ln = lines[i]
        if _MD_FENCE.match(ln):
            in_fence = not in_fence  # the fence line itself is markup; the code is kept
            body.append("")
        elif in_fence:
            body.append(ln)
        elif m := _MD_ATX.match(ln):
            flush()
            heading = _md_inline(m.group(2))
            title = title or (heading if len(m.group(1)) == 1 else None)
            blocks.append((heading, "", i + 1))
            body_start = i + 2
        elif (i + 1 < len(lines) and ln.strip() and _MD_SETEXT.match(lines[i + 1])
              and not (body and body[-1].strip())):
            flush()
            heading = _md_inline(ln.strip())
            title = title or (heading if lines[i + 1].lstrip().startswith("=") else None)
            blocks.append((heading, "", i + 1))
            i += 1
            body_start = i + 2
        elif _MD_REFDEF.match(ln):
            body.append("")
        else:
            if not body:
                body_start = i + 1
            body.append(_md_inline(ln))
        i += 1
    flush()
    return title, _sections_from_blocks(blocks)


# ----------------------------------------------------------------------------- reStructuredText

_RST_ADORN = re.compile(r"^([=\-`:'\"~^_*+#<>.])\1{2,}\s*$")
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_RST_TARGET = re.compile(r"^\s*\.\.\s+(_[^:]+:|\[[^\]]+\]|\|[^|]+\|).*$")
_RST_COMMENT = re.compile(r"^\s*\.\.(\s.*)?$")
_RST_OPTION = re.compile(r"^\s+:[\w-]+:(\s.*)?$")
_RST_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")
_RST_REF = re.compile(r"`([^`<]*?)\s*<[^>]*>`_{1,2}")
_RST_SIMPLE_REF = re.compile(r"`([^`]+)`_{1,2}")
# Directives whose body is navigation or markup, not prose.
_RST_SKIP = {"index", "toctree", "highlight", "sectionauthor", "moduleauthor", "only", "raw", "include",
             "testsetup", "testcleanup", "currentmodule", "tabularcolumns", "image", "figure", "literalinclude"}
# Directives whose argument is a language name or options, not text (their body is kept).
_RST_CODE = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput"}
# Directives that document one API object: each starts a section titled by its signature, so a
# passage never mixes two functions' descriptions.
_RST_ENTRIES = {"function", "class", "method", "data", "attribute", "exception", "classmethod",
                "staticmethod", "decorator", "decoratormethod", "coroutinefunction", "coroutinemethod",
                "abstractmethod", "describe", "opcode", "envvar", "option", "cmdoption", "property"}
_RST_VERSION = {"versionadded": "New in version", "versionchanged": "Changed in version",
                "deprecated": "Deprecated since version", "deprecated-removed": "Deprecated since version"}


def _rst_inline(s: str) -> str:
    def role(m):
        t = m.group(1)
        t = re.sub(r"\s*<[^>]*>$", "", t) if "<" in t and t.endswith(">") and not t.startswith("<") else t
        return t.lstrip("~!")
    s = _RST_ROLE.sub(role, s)
    s = _RST_LITERAL.sub(r"\1", s)
    s = _RST_REF.sub(r"\1", s)
    s = _RST_SIMPLE_REF.sub(r"\1", s)
    return s.replace("**", "")


def read_rst(raw: str) -> tuple[str | None, list[Section]]:
    lines = raw.splitlines()
    out: list[str] = []  # lines kept (markup removed), "" where something was dropped
    headings: dict[int, str] = {}  # index in `out` of a heading (or API entry) -> its title
    skip_indent: int | None = None  # inside a skipped directive's block: its indentation
    entry_indent: int | None = None  # inside an API entry: its directive's indentation
    section = ""  # the heading an API entry's trailing text returns to
    i = 0
    while i < len(lines):
        ln = lines[i]
        indent = len(ln) - len(ln.lstrip())
        if skip_indent is not None:
            if ln.strip() and indent <= skip_indent:
                skip_indent = None
            else:
                out.append("")
                i += 1
                continue
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if entry_indent is not None and ln.strip() and indent <= entry_indent and not (
                (m := _RST_DIRECTIVE.match(ln)) and m.group(2).lower() in _RST_ENTRIES):
            entry_indent = None
            headings[len(out)] = section  # text after an entry belongs to the enclosing section
            out.append("")
        # Heading: a text line underlined (and maybe overlined) with one repeated punctuation char.
        if (ln.strip() and not _RST_ADORN.match(ln) and _RST_ADORN.match(nxt)
                and len(nxt.strip()) >= len(ln.strip()) and indent == 0):
            if out and _RST_ADORN.match(lines[i - 1] if i else ""):
                out[-1] = ""
            section = _rst_inline(ln.strip())
            headings[len(out)] = section
            out.append("")
            out.append("")
            i += 2
            continue
        if _RST_ADORN.match(ln) and not nxt.strip():
            out.append("")  # a transition line
        elif m := _RST_DIRECTIVE.match(ln):
            name, arg = m.group(2).lower(), _rst_inline(m.group(3).strip())
            if name in _RST_SKIP:
                skip_indent = indent
                out.append("")
            elif name in _RST_ENTRIES and arg:
                headings[len(out)] = arg
                entry_indent = indent
                out.append("")
            elif name in _RST_CODE:
                out.append("")  # `.. code-block:: python`: the code stays, the language name is markup
            elif name in _RST_VERSION:
                # At the body's indentation, so the note and its body dedent as one paragraph.
                out.append(" " * (indent + 3) + f"{_RST_VERSION[name]} {arg.split()[0] if arg else ''}".rstrip() + ".")
            else:
                out.append((" " * indent + arg) if arg else "")
            while i + 1 < len(lines) and _RST_OPTION.match(lines[i + 1]):
                i += 1
                out.append("")
        elif _RST_TARGET.match(ln) or _RST_COMMENT.match(ln):
            out.append("")
            if _RST_COMMENT.match(ln) and not _RST_TARGET.match(ln):
                skip_indent = indent  # a comment's indented continuation is the comment too
        else:
            s = _rst_inline(ln)
            # "text::" introduces a literal block: one colon is what a reader sees.
            out.append(s[:-1] if s.endswith("::") and s.strip() != "::" else ("" if s.strip() == "::" else s))
        i += 1
    blocks: list[tuple[str | None, str, int]] = []
    start = 0
    title = None
    for at in sorted(headings) + [len(out)]:
        for p, n in _paragraphs(out[start:at], start + 1):
            blocks.append((None, p, n))
        if at < len(out):
            title = title or headings[at]
            blocks.append((headings[at], "", at + 1))
        start = at + 1
    return title, _sections_from_blocks(blocks)


# ----------------------------------------------------------------------------- HTML

_HTML_BLOCK = {"p", "div", "li", "ul", "ol", "br", "tr", "table", "section", "article", "pre", "blockquote",
               "dd", "dt", "dl", "header", "footer", "main", "aside", "figure", "figcaption", "hr", "td", "th"}
_HTML_SKIP = {"script", "style", "noscript", "template", "svg", "head", "nav"}
_HTML_HEAD = {"h1", "h2", "h3", "h4", "h5", "h6"}


class _HTMLText(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str | None, str, int]] = []
        self.title: str | None = None
        self.h1: str | None = None
        self._buf: list[str] = []
        self._line = 1
        self._skip = 0
        self._in_title = False
        self._heading: list[str] | None = None
        self._pre = 0

    def _flush(self):
        text = "".join(self._buf)
        if not self._pre:
            text = " ".join(text.split())
        if text.strip():
            self.blocks.append((None, text.strip("\n"), self._line))
        self._buf = []

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self._in_title = True
        elif tag in _HTML_SKIP:
            self._skip += 1
        elif tag in _HTML_HEAD:
            self._flush()
            self._heading = []
        elif tag in _HTML_BLOCK:
            self._flush()
            self._pre += tag == "pre"
        if not self._buf:
            self._line = self.getpos()[0]

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        elif tag in _HTML_SKIP:
            self._skip = max(0, self._skip - 1)
        elif tag in _HTML_HEAD and self._heading is not None:
            heading = " ".join("".join(self._heading).split())
            if heading:
                self.blocks.append((heading, "", self.getpos()[0]))
                if tag == "h1" and self.h1 is None:
                    self.h1 = heading
            self._heading = None
        elif tag in _HTML_BLOCK:
            self._flush()
            if tag == "pre":
                self._pre = max(0, self._pre - 1)

    def handle_data(self, data):
        if self._in_title:
            self.title = ((self.title or "") + data).strip()
        elif self._skip:
            return
        elif self._heading is not None:
            self._heading.append(data)
        else:
            if not self._buf:
                self._line = self.getpos()[0]
            self._buf.append(data)


def read_html(raw: str) -> tuple[str | None, list[Section]]:
    p = _HTMLText()
    p.feed(raw)
    p.close()
    p._flush()
    title = " ".join(p.title.split()) if p.title else p.h1
    return title, _sections_from_blocks(p.blocks)


# ----------------------------------------------------------------------------- JSONL


def read_jsonl(raw: str, path: Path) -> Iterator[Document]:
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise KakiError(f"{path}:{n}: not valid JSON ({e}); each line must be an object with a `text` field")
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise KakiError(f"{path}:{n}: each line must be a JSON object with a string `text` field "
                            "(and optional `title`, `url`, `id`)")
        ref = str(rec["id"]) if rec.get("id") is not None else str(n)
        title = str(rec.get("title") or f"{_stem(path)} #{ref}")
        sec = Section(title="", text=rec["text"].strip(), lines=[(0, n)])
        if sec.text:
            yield Document(title=title, sections=[sec], ref=ref, url=str(rec.get("url") or ""))
