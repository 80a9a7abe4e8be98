"""Small file helpers every subsystem shares: a file written whole or not at all, and JSONL read
line by line. (A whole model directory is written atomically by `kaki.checkpoint.write_atomically`.)"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, Iterator


def write_file_atomically(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> Path:
    """Write `data` (text as UTF-8) to `path` so that a reader, or a crash, sees the old file or the
    new one, never half of one: a temporary file in the same directory, renamed over `path`.

    A file that exists keeps its permissions; a new one gets the umask's (0666 & ~umask), as a
    plain write would. fsync=False skips flushing to disk (a cache any crash may lose)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        keep = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        keep = None
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if keep is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if keep is not None:
                os.fchmod(f.fileno(), keep)
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def jsonl_lines(path: str | os.PathLike) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, value, None) for each non-blank line of a JSONL file that parses, and
    (line number, None, why not) for each that does not. Lines are split as bytes and decoded one
    by one, so a bad byte costs only its own line and is reported at its own line number; what a
    bad line means (stop, skip, count) is the caller's."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw.decode("utf-8")), None
            except UnicodeDecodeError as e:
                yield lineno, None, f"not UTF-8 (byte {e.start + 1} of the line is {raw[e.start]:#04x})"
            except json.JSONDecodeError as e:
                yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"
            except RecursionError:
                yield lineno, None, "invalid JSON (nested too deeply)"
