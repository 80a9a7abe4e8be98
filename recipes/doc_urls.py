"""Where a passage of the Python documentation lives on docs.python.org: its page and anchor.

Passage ids (recipes/rst.py) are `SOURCE#section-slug`, `SOURCE:dotted.name` for an API entry and
`SOURCE:term:TERM` for a glossary term, with `~N` on repeats. Sphinx names its anchors the same
way for sections, Python objects (`#str.join`), C API objects (`#c.PyDict_New`) and terms
(`#term-text-file`); anything else (command-line options, repeats) links to its page.

    python recipes/doc_urls.py data/pydocs/passages.jsonl.gz   # add `url` to each record, in place
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys

BASE = "https://docs.python.org/3.11/"  # the passages come from the 3.11 documentation
_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def doc_url(pid: str, source: str) -> str:
    page = BASE + source + ".html"
    if "~" in pid:  # a repeated title: Sphinx numbers its anchor in a way the id does not record
        return page
    rest = pid[len(source):]
    if rest.startswith("#"):
        return page + rest
    if rest.startswith(":term:"):
        return page + "#term-" + _slug(rest[len(":term:"):])
    name = rest[1:]
    if rest.startswith(":") and _NAME.match(name):
        return page + "#" + ("c." + name if source.startswith(("c-api/", "extending/")) else name)
    return page


def main(path: str) -> None:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for r in records:
        r["url"] = doc_url(r["id"], r["source"])
    tmp = f"{path}.tmp-{os.getpid()}"
    # mtime=0: the same records give the same bytes, so a rerun changes nothing in git.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    os.replace(tmp, path)
    print(f"{path}: {len(records)} records, url added")


if __name__ == "__main__":
    main(sys.argv[1])
