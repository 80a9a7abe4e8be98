"""Where kaki's bundled files live."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO_ROOT / "models" / "kaki-tiny"


def bundled_model() -> Path | None:
    """The demo model shipped in the repository, if this checkout has it."""
    return BUNDLED_MODEL if (BUNDLED_MODEL / "config.json").is_file() else None
