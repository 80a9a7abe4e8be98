"""loss.png (issue #19): a title, axis labels, a legend, round-valued ticks, and the eval line
visible over the train line. The PNG is decoded here with zlib, independently of the writer."""

from __future__ import annotations

import struct
import zlib

import pytest

from kaki.train import logs
from kaki.train.logs import BLUE, ORANGE, nice_ticks, tick_label, write_loss_png


def decode(path) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB PNG with filter 0 on every row."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w, h = 8, b"", None, None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0]
        if kind == b"IHDR":
            w, h, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    rows = [raw[y * (3 * w + 1):(y + 1) * (3 * w + 1)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    return w, h, [r[1:] for r in rows]


def count(rows, color, box=None) -> int:
    x0, y0, x1, y1 = box or (0, 0, len(rows[0]) // 3, len(rows))
    c = bytes(color)
    return sum(rows[y][3 * x:3 * x + 3] == c for y in range(y0, y1) for x in range(x0, x1))


def ink(rows, box) -> int:
    x0, y0, x1, y1 = box
    return sum(rows[y][3 * x:3 * x + 3] == b"\0\0\0" for y in range(y0, y1) for x in range(x0, x1))


def test_eval_line_is_drawn_over_the_train_line(tmp_path):
    """Identical train and eval curves: where they coincide the eval colour is what shows."""
    pts = [(s, 3.0 - s * 0.1) for s in range(1, 21)]
    path = write_loss_png(tmp_path / "loss.png", pts, pts[4::5])
    w, h, rows = decode(path)
    assert (w, h) == (logs.W, logs.H)
    plot = (logs.LEFT + 1, logs.TOP, w - logs.RIGHT, h - logs.BOTTOM)
    # The eval segment from step 5 to 20 covers the train line there: its midpoint is orange.
    xa, xb = logs.LEFT, w - logs.RIGHT
    s_mid = 12.5
    x = round(xa + (xb - xa) * (s_mid - 0) / (20 - 0))  # x ticks run 0..20
    column = [rows[y][3 * x:3 * x + 3] for y in range(plot[1], plot[3])]
    assert bytes(ORANGE) in column and bytes(BLUE) not in column
    # The train line shows on its own before the first eval point, and in the legend.
    assert count(rows, BLUE, plot) > 20
    assert count(rows, ORANGE, plot) > 3 * count(rows, BLUE, plot) // 4  # the thick line


def test_title_axis_labels_legend_and_ticks_are_drawn(tmp_path):
    train = [(s, 5.0 / s + 1.0) for s in range(1, 101)]
    path = write_loss_png(tmp_path / "loss.png", train, [(50, 1.2), (100, 1.1)])
    w, h, rows = decode(path)
    assert ink(rows, (0, 0, w, logs.TOP - 30)) > 100  # the title band
    assert ink(rows, (0, logs.TOP - 30, logs.LEFT, logs.TOP)) > 40  # "loss" over the y axis
    assert ink(rows, (logs.LEFT, h - 30, w, h)) > 40  # "step" under the x axis
    assert ink(rows, (0, logs.TOP, logs.LEFT - 2, h - logs.BOTTOM + 8)) > 200  # y tick labels
    assert ink(rows, (logs.LEFT - 10, h - logs.BOTTOM + 4, w, h - 30)) > 200  # x tick labels
    legend = (w - logs.RIGHT - 130, logs.TOP, w - logs.RIGHT, logs.TOP + 60)
    assert count(rows, BLUE, legend) > 20 and count(rows, ORANGE, legend) > 20 and ink(rows, legend) > 100
    # Every character the chart writes has a glyph (a missing one would raise, not draw a blank).
    for s in (logs.TITLE, "loss", "step", "train", "eval", "0123456789.-"):
        assert all(ch in logs.GLYPHS for ch in s)


@pytest.mark.parametrize("lo,hi,expected", [
    (0.83, 4.2, [0, 1, 2, 3, 4, 5]),
    (2.31, 2.37, [2.30, 2.32, 2.34, 2.36, 2.38]),
    (1, 3, [1, 1.5, 2, 2.5, 3]),
    (1, 1200, [0, 250, 500, 750, 1000, 1250]),
])
def test_ticks_are_round_values_covering_the_range(lo, hi, expected):
    ticks = nice_ticks(lo, hi)
    assert ticks == pytest.approx(expected)
    assert ticks[0] <= lo and ticks[-1] >= hi


def test_tick_labels_have_just_enough_decimals():
    assert [tick_label(v, 0.02) for v in (2.3, 2.32)] == ["2.30", "2.32"]
    assert [tick_label(v, 0.25) for v in (0.5, 0.75)] == ["0.50", "0.75"]
    assert [tick_label(v, 0.5) for v in (1.0, 1.5)] == ["1.0", "1.5"]
    assert [tick_label(v, 250) for v in (0, 250)] == ["0", "250"]
