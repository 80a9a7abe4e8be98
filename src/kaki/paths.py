"""Where kaki's bundled files and its per-user cache live."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO_ROOT / "models" / "kaki-tiny"


def bundled_model() -> Path | None:
    """The demo model shipped in the repository, if this checkout has it."""
    return BUNDLED_MODEL if (BUNDLED_MODEL / "config.json").is_file() else None


def cache_root() -> Path:
    """kaki's per-user cache (built kernels, small-M timings): $KAKI_CACHE_DIR or ~/.cache/kaki."""
    return Path(os.environ.get("KAKI_CACHE_DIR") or Path.home() / ".cache" / "kaki")
