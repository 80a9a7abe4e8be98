"""kaki.files: the one atomic file write and the one JSONL reader every subsystem uses."""

from __future__ import annotations

import os
import stat

import pytest

from kaki.files import jsonl_lines, write_file_atomically


def test_jsonl_lines_parse_each_line_on_its_own(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n  \n{"text": \n{"text": "\xff"}\n[1, 2]\n' + b"[" * 100_000 + b"\n")
    got = list(jsonl_lines(path))
    assert [n for n, _, _ in got] == [1, 4, 5, 6, 7]  # blank lines skipped, numbers kept
    assert got[0] == (1, {"text": "a"}, None) and got[3] == (6, [1, 2], None)
    assert got[1][1] is None and got[1][2].startswith("invalid JSON")
    assert got[2][2] == "not UTF-8 (byte 11 of the line is 0xff)"
    assert got[4][2] == "invalid JSON (nested too deeply)"


def test_an_atomic_write_replaces_whole_keeps_the_mode_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    write_file_atomically(path, "one")
    assert path.read_text() == "one"
    path.chmod(0o640)
    write_file_atomically(path, b"two")
    assert path.read_bytes() == b"two" and stat.S_IMODE(os.stat(path).st_mode) == 0o640
    with pytest.raises(TypeError):
        write_file_atomically(path, 3)  # fails while writing: the old file stays, no temporary file
    assert path.read_bytes() == b"two" and os.listdir(path.parent) == ["f.txt"]
