"""What a training run reports: loguru log file, metrics.jsonl, loss.png, optional W&B.

loss.png is drawn here with zlib (a few lines of rasterising) rather than matplotlib, which would be
a 40 MB dependency for one curve: train loss in blue, eval loss in orange, axes labelled with the
step range and the loss range in a tiny built-in digit font.
"""

from __future__ import annotations

import json
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

W, H, LEFT, BOTTOM, TOP, RIGHT = 640, 400, 48, 24, 12, 12
BLUE, ORANGE, GREY, BLACK = (31, 119, 180), (255, 127, 14), (200, 200, 200), (0, 0, 0)
# 3x5 glyphs, one int per row, bit 2 = leftmost pixel.
FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7), "k": (4, 5, 6, 5, 5),
}


class Canvas:
    def __init__(self):
        self.px = bytearray(b"\xff" * (W * H * 3))

    def set(self, x: int, y: int, c) -> None:
        if 0 <= x < W and 0 <= y < H:
            i = (y * W + x) * 3
            self.px[i:i + 3] = bytes(c)

    def line(self, x0, y0, x1, y1, c) -> None:
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            self.set(round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n), c)

    def text(self, x: int, y: int, s: str, scale: int = 2) -> None:
        for ch in s:
            for r, bits in enumerate(FONT.get(ch, (0,) * 5)):
                for b in range(3):
                    if bits >> (2 - b) & 1:
                        for dx in range(scale):
                            for dy in range(scale):
                                self.set(x + b * scale + dx, y + r * scale + dy, BLACK)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * W * 3:(y + 1) * W * 3]) for y in range(H))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def _fmt(v: float) -> str:
    return f"{v:.3g}".replace("e+0", "e").replace("e-0", "e-")


def write_loss_png(path: Path, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> Path:
    c = Canvas()
    pts = train + evals
    x0, x1, y0, y1 = LEFT, W - RIGHT, H - BOTTOM, TOP
    c.line(x0, y0, x1, y0, BLACK)
    c.line(x0, y0, x0, y1, BLACK)
    if pts:
        smin, smax = min(s for s, _ in pts), max(s for s, _ in pts)
        lmin, lmax = min(v for _, v in pts), max(v for _, v in pts)
        smax, lmax = max(smax, smin + 1), max(lmax, lmin + 1e-6)

        def xy(s, v):
            return (x0 + (x1 - x0) * (s - smin) / (smax - smin), y0 + (y1 - y0) * (v - lmin) / (lmax - lmin))

        for frac in (0.25, 0.5, 0.75):
            gy = round(y0 + (y1 - y0) * frac)
            c.line(x0 + 1, gy, x1, gy, GREY)
        for series, color in ((train, BLUE), (evals, ORANGE)):
            for (a, b) in zip(series, series[1:]):
                c.line(*map(round, xy(*a)), *map(round, xy(*b)), color)
            for s, v in series if len(series) < 50 or color == ORANGE else []:
                px, py = map(round, xy(s, v))
                for d in range(-1, 2):
                    c.set(px + d, py, color)
                    c.set(px, py + d, color)
        c.text(2, y1, _fmt(lmax))
        c.text(2, y0 - 10, _fmt(lmin))
        c.text(x0, y0 + 8, str(smin))
        c.text(x1 - 4 * 2 * len(str(smax)), y0 + 8, str(smax))
    write_file_atomically(path, c.png())
    return path
