"""What a training run reports: loguru log file, metrics.jsonl, loss.png, optional W&B.

loss.png is drawn here with zlib (a few lines of rasterising) rather than matplotlib, which would be
a 40 MB dependency for one chart: the train loss as a thin blue line, the eval loss thick and orange
over it, a title, axis labels, a legend and round-valued ticks in a small built-in 5x7 font.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from pathlib import Path

from loguru import logger
from tqdm import tqdm

from kaki.files import write_file_atomically

METRICS = "metrics.jsonl"
LOG = "train.log"
PLOT = "loss.png"


def setup_logging(out: Path, enabled: bool):
    """loguru to OUT/train.log (everything) and to the terminal through tqdm.write (INFO), so log
    lines do not tear the progress bar. Returns the handler ids to remove at the end."""
    try:
        logger.remove(0)  # loguru's default stderr handler: ours below replaces it
    except ValueError:
        pass
    if not enabled:
        return []
    fmt = "{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | {message}"
    return [logger.add(out / LOG, level="DEBUG", format=fmt, enqueue=False),
            logger.add(lambda m: tqdm.write(m, end="", file=sys.stderr), level="INFO",
                       format="{message}", colorize=False)]


class Metrics:
    """Appends one JSON object per line to OUT/metrics.jsonl and keeps them for the plot."""

    def __init__(self, out: Path, resume_step: int | None, wandb_run=None):
        self.path = Path(out) / METRICS
        self.rows: list[dict] = []
        if resume_step is not None and self.path.is_file():
            # A resumed run rewrites history after its checkpoint: drop lines from the lost steps.
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if row.get("step", 0) <= resume_step:
                    self.rows.append(row)
        write_file_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.wandb = wandb_run

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def plot(self, out: Path) -> Path:
        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        return write_loss_png(Path(out) / PLOT, train, evals)


# ----------------------------------------------------------------------------- loss.png

W, H = 800, 480
LEFT, RIGHT, TOP, BOTTOM = 84, 32, 52, 60  # plot area margins: tick labels left and below
TITLE = "training loss"
BLUE, ORANGE, GREY, BLACK = (110, 160, 210), (230, 100, 0), (222, 222, 222), (0, 0, 0)
# 5x7 glyphs, '#' = ink (g and p hang two rows below): the characters the title, axis labels,
# legend and tick labels use.
GLYPHS = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
    ".": ("     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "),
    "-": ("     ", "     ", "     ", "#####", "     ", "     ", "     "),
    " ": ("     ",) * 7,
    "a": ("     ", "     ", " ### ", "    #", " ####", "#   #", " ####"),
    "e": ("     ", "     ", " ### ", "#   #", "#####", "#    ", " ### "),
    "g": ("     ", "     ", " ####", "#   #", "#   #", "#   #", " ####", "    #", " ### "),
    "i": ("  #  ", "     ", " ##  ", "  #  ", "  #  ", "  #  ", " ### "),
    "k": ("#    ", "#    ", "#  # ", "# #  ", "##   ", "# #  ", "#  # "),
    "l": (" ##  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "n": ("     ", "     ", "# ## ", "##  #", "#   #", "#   #", "#   #"),
    "o": ("     ", "     ", " ### ", "#   #", "#   #", "#   #", " ### "),
    "p": ("     ", "     ", "#### ", "#   #", "#   #", "#   #", "#### ", "#    ", "#    "),
    "r": ("     ", "     ", "# ## ", "##  #", "#    ", "#    ", "#    "),
    "s": ("     ", "     ", " ####", "#    ", " ### ", "    #", "#### "),
    "t": (" #   ", " #   ", "#### ", " #   ", " #   ", " #  #", "  ## "),
    "v": ("     ", "     ", "#   #", "#   #", "#   #", " # # ", "  #  "),
}
SCALE = 2  # each glyph pixel is 2x2: 10x14 characters, 12 px apart


class Canvas:
    def __init__(self):
        self.px = bytearray(b"\xff" * (W * H * 3))

    def set(self, x: int, y: int, c) -> None:
        if 0 <= x < W and 0 <= y < H:
            i = (y * W + x) * 3
            self.px[i:i + 3] = bytes(c)

    def line(self, x0, y0, x1, y1, c, width: int = 1) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        r = range(-(width // 2), width - width // 2)
        for i in range(n + 1):
            x, y = round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n)
            for dx in r:
                for dy in r:
                    self.set(x + dx, y + dy, c)

    def text(self, x: int, y: int, s: str, c=BLACK) -> None:
        for ch in s:
            for r, row in enumerate(GLYPHS[ch]):
                for b, ink in enumerate(row):
                    if ink == "#":
                        for dx in range(SCALE):
                            for dy in range(SCALE):
                                self.set(x + b * SCALE + dx, y + r * SCALE + dy, c)
            x += 6 * SCALE

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * W * 3:(y + 1) * W * 3]) for y in range(H))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def text_width(s: str) -> int:
    return 6 * SCALE * len(s) - SCALE


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round values (1, 2, 2.5 or 5 times a power of ten apart) covering [lo, hi]: the
    first at or below lo, the last at or above hi, so the axis ends on labelled values."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9) * step
    count = math.ceil((hi - first) / step - 1e-9)
    return [round(first + i * step, 12) for i in range(count + 1)]


def tick_label(v: float, step: float) -> str:
    """Enough decimals to tell neighbouring ticks apart, no more."""
    exp = math.floor(math.log10(step) + 1e-9)
    mantissa = round(step / 10 ** exp, 6)
    decimals = max(0, -exp + (1 if mantissa == 2.5 else 0))  # 0.25 apart: two decimals, not one
    return f"{v:.{decimals}f}"


def write_loss_png(path: Path, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> Path:
    """Loss by step: the train loss as a thin light line, the eval loss as a thick orange line
    with markers drawn over it (eval points are few and matter most), round-valued ticks and a
    grid on both axes, a title, axis labels and a legend."""
    c = Canvas()
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP  # y0 is the bottom edge (pixel rows grow down)
    c.text((W - text_width(TITLE)) // 2, 10, TITLE)
    c.text(8, TOP - 24, "loss")
    c.text((x0 + x1 - text_width("step")) // 2, H - 26, "step")
    pts = train + evals
    if pts:
        smin, smax = min(s for s, _ in pts), max(s for s, _ in pts)
        lmin, lmax = min(v for _, v in pts), max(v for _, v in pts)
        xt = [t for t in nice_ticks(smin, max(smax, smin + 1)) if float(t).is_integer()] or [smin, smin + 1]
        yt = nice_ticks(lmin, lmax)
        xa, xb, ya, yb = xt[0], xt[-1], yt[0], yt[-1]
        xb = max(xb, xa + 1)

        def xy(s, v):
            return (round(x0 + (x1 - x0) * (s - xa) / (xb - xa)), round(y0 + (y1 - y0) * (v - ya) / (yb - ya)))

        for t in yt:
            _, gy = xy(xa, t)
            c.line(x0, gy, x1, gy, GREY)
            label = tick_label(t, yt[1] - yt[0] if len(yt) > 1 else 1.0)
            c.text(x0 - 8 - text_width(label), gy - 7, label)
        for t in xt:
            gx, _ = xy(t, ya)
            c.line(gx, y0, gx, y1, GREY)
            label = str(int(t))
            c.text(gx - text_width(label) // 2, y0 + 8, label)
        for (a, b) in zip(train, train[1:]):
            c.line(*xy(*a), *xy(*b), BLUE)
        if len(train) == 1:
            c.line(*xy(*train[0]), *xy(*train[0]), BLUE, width=3)
        for (a, b) in zip(evals, evals[1:]):
            c.line(*xy(*a), *xy(*b), ORANGE, width=3)
        for s, v in evals:
            px, py = xy(s, v)
            c.line(px - 4, py, px + 4, py, ORANGE, width=3)
            c.line(px, py - 4, px, py + 4, ORANGE, width=3)
        # The legend, top right inside the plot: a swatch of each line and its name.
        lx, ly = x1 - 120, y1 + 10
        for name, color, width, shown in (("train", BLUE, 1, train), ("eval", ORANGE, 3, evals)):
            if shown:
                c.line(lx, ly + 7, lx + 28, ly + 7, color, width=max(width, 3))
                c.text(lx + 36, ly, name)
                ly += 22
    c.line(x0, y0, x1, y0, BLACK)
    c.line(x0, y0, x0, y1, BLACK)
    write_file_atomically(path, c.png())
    return path
