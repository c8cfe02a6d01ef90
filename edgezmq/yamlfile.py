"""Read a YAML file, turning I/O and syntax problems into the caller's error type."""

from __future__ import annotations

import os
from typing import Any


def read_yaml(path: str | os.PathLike, error: type[Exception], what: str = "file") -> Any:
    """The parsed document; ``error("PATH: cannot read <what> (...)")`` or ``error("PATH: not valid YAML (...)")``."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a text file ({e.reason})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e})") from None
