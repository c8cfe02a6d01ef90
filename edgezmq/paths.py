"""Where edgezmq keeps its files: the cache root shared by checkpoints and profiles."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "EDGEZMQ_CACHE"
DEFAULT_CACHE_ROOT = Path("~/.cache/edgezmq")


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The edgezmq cache root: `cache_dir`, else $EDGEZMQ_CACHE, else ~/.cache/edgezmq."""
    root = cache_dir if cache_dir is not None else os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT
    return Path(root).expanduser()


CHECKPOINT_DIR = "checkpoints"  # seeded checkpoints, under the root; a node's default weights directory


def checkpoints_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """<root>/checkpoints: where seeded checkpoints are written, and a node reads weights by default."""
    return cache_root(cache_dir) / CHECKPOINT_DIR
