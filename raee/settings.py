"""Defaults every entry point shares, importable without loading torch (the CLI starts in a fraction of a second)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR_ENV = "RAEE_CACHE_DIR"
DEFAULT_BACKBONE = "gemma-3-270m"
DEFAULT_ENCODER = "all-minilm-l6-v2"


def default_cache_dir() -> Path:
    """$RAEE_CACHE_DIR, else the user's cache folder (~/.cache/raee)."""
    root = os.environ.get(CACHE_DIR_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "raee"
    return Path(root).expanduser()
