"""Read YAML safely: no object construction, no alias bombs, and I/O or syntax problems as the caller's error type."""

from __future__ import annotations

import os
from typing import Any

import yaml

MAX_VALUES = 100_000  # a document, aliases followed, may hold this many values (plans hold hundreds)
# libyaml's loader where PyYAML was built with it (same safe constructors, ~10x faster)
_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class ExpansionError(yaml.YAMLError):
    """A document whose aliases expand it beyond ``MAX_VALUES`` (a "billion laughs" file)."""


def _too_big(doc: Any, limit: int) -> bool:
    """True if `doc`, with every alias expanded, holds more than `limit` values (stops early)."""
    seen, stack = 0, [doc]
    while stack:
        v = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def safe_load(text: str, limit: int = MAX_VALUES) -> Any:
    """``yaml.safe_load`` that refuses documents expanding beyond `limit` values (ExpansionError).

    Aliases share one object when loaded, so composing such a file is cheap; what is not is
    everything after: walking it, printing it in an error message (an 8-level alias bomb
    echoed 226 MB into stderr). The check walks at most `limit` values.
    """
    doc = yaml.load(text, Loader=_LOADER)  # a safe loader: plain data only
    if _too_big(doc, limit):
        raise ExpansionError(f"the document expands to more than {limit} values (YAML aliases "
                             "repeating one another?): refused")
    return doc


def read_yaml(path: str | os.PathLike, error: type[Exception], what: str = "file") -> Any:
    """The parsed document; ``error("PATH: cannot read <what> (...)")`` or ``error("PATH: not valid YAML (...)")``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a text file ({e.reason})") from None
    try:
        return safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({e})") from None
