"""Typed readers for the fields of YAML config files, each raising its caller's error naming the field path.

Every parser of a file a person writes (plan files, cluster inventories, node configs,
planner problems, testbed configs) reads its fields through a ``Fields`` bound to its own
error class, so that a field is checked, and its error worded, the same way everywhere:

    F = Fields(prefixed(PlanFileError))       # errors read "model.microbatch: expected ..."
    mb = F.integer(m.get("microbatch", 8), "model.microbatch", lo=1, hi=MAX_MICROBATCH)

Numbers are finite (``.inf`` and ``.nan`` are refused) and within the range the caller
gives, which its docs state; an offending value is shown cut to ``MAX_ECHO`` characters.
``read_yaml`` reads the file (``safe_load``: plain data only, no alias bombs), its I/O and
syntax errors also raised as the caller's error. No dependencies but PyYAML.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import yaml

from edgezmq.terms import MAX_BYTES

__all__ = ["Fields", "prefixed", "read_yaml", "safe_load", "shown", "ExpansionError", "REQUIRED", "SIZE_UNITS"]

ErrorFactory = Callable[[str, str], Exception]  # (field path, message) -> the caller's error

REQUIRED: Any = object()  # `default` of a field that must be given
MAX_ECHO = 200  # characters of an offending value an error message shows

# sizes: decimal (powers of 1000) and binary (powers of 1024) units, case-insensitive
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
SIZE_EXAMPLE = "'6GB' or '512MiB'"


def prefixed(error: type[Exception]) -> ErrorFactory:
    """An error factory for an exception class that takes one message: ``"PATH: message"``."""
    return lambda path, message: error(f"{path}: {message}" if path else message)


def shown(v: Any) -> str:
    """``repr(v)``, cut to ``MAX_ECHO`` characters: an error names a value, it never echoes a file back."""
    text = repr(v)
    return text if len(text) <= MAX_ECHO else f"{text[:MAX_ECHO]}... ({len(text)} characters)"


def _kind(v: Any) -> str:
    return type(v).__name__


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"  # 67108864, not 6.71089e+07


def _interval(lo: float, hi: float, lo_open: bool, hi_open: bool) -> str:
    return f" in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"


class Fields:
    """Field readers raising ``error(path, message)``: ``Fields(prefixed(MyError))``, or
    ``Fields(MyError)`` for an error class that takes the path and the message apart."""

    def __init__(self, error: ErrorFactory) -> None:
        self.error = error

    def fail(self, path: str, message: str) -> NoReturn:
        raise self.error(path, message)

    # ---- structure -----------------------------------------------------------------------------
    def mapping(self, v: Any, path: str, keys: Sequence[str] | None = None) -> Mapping[str, Any]:
        """A mapping; with ``keys``, one with no other fields."""
        if not isinstance(v, Mapping):
            self.fail(path, f"expected a mapping, got {_kind(v)} {shown(v)}")
        if keys is not None:
            unknown = [k for k in v if k not in keys]
            if unknown:
                self.fail(path, f"unknown field(s) {shown(unknown)} (known: {list(keys)})")
        return v

    def seq(self, v: Any, path: str, *, nonempty: bool = False) -> Sequence[Any]:
        """A list (a string is not one)."""
        if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
            self.fail(path, f"expected a list, got {_kind(v)} {shown(v)}")
        if nonempty and not v:
            self.fail(path, "expected a non-empty list")
        return v

    def need(self, d: Any, key: str, types: type | tuple[type, ...], path: str, default: Any = REQUIRED) -> Any:
        """``d[key]`` of one of ``types`` (a bool is not an int), ``default`` when absent or
        null; the path of the field is ``path.key``."""
        d = self.mapping(d, path)
        where = f"{path}.{key}" if path else key
        if key not in d or d[key] is None:
            if default is REQUIRED:
                self.fail(where, "missing")
            return default
        v = d[key]
        want = types if isinstance(types, tuple) else (types,)
        if not isinstance(v, want) or (isinstance(v, bool) and bool not in want and int in want):
            self.fail(where, f"expected {' or '.join(t.__name__ for t in want)}, got {_kind(v)} {shown(v)}")
        return v

    # ---- scalars --------------------------------------------------------------------------------
    def string(self, v: Any, path: str) -> str:
        """A non-empty string."""
        if not isinstance(v, str) or not v.strip():
            self.fail(path, f"expected a non-empty string, got {_kind(v)} {shown(v)}")
        return v

    def boolean(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            self.fail(path, f"expected true or false, got {_kind(v)} {shown(v)}")
        return v

    def choice(self, v: Any, path: str, options: Sequence[str]) -> str:
        if v not in options:
            self.fail(path, f"expected one of {', '.join(options)}, got {shown(v)}")
        return v

    def number(self, v: Any, path: str, *, lo: float, hi: float,
               lo_open: bool = False, hi_open: bool = False, strings: bool = False,
               what: str = "a number") -> float:
        """A finite real in [lo, hi] (``*_open``: the bound itself excluded): every number a
        file gives has a finite range (edgezmq.terms has the shared ones). ``strings``: accept ``"8e9"``, which YAML 1.1 reads as text."""
        x = v
        if strings and isinstance(v, str):
            try:
                x = float(v)
            except ValueError:
                self.fail(path, f"expected {what}, got {_kind(v)} {shown(v)}")
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            self.fail(path, f"expected {what}, got {_kind(v)} {shown(v)}")
        below = lo is not None and (x <= lo if lo_open else x < lo)
        above = hi is not None and (x >= hi if hi_open else x > hi)
        if not math.isfinite(x) or below or above:
            self.fail(path, f"expected {what}{_interval(lo, hi, lo_open, hi_open)}, got {shown(v)}"
                            + ("" if math.isfinite(x) else " (not a finite number)"))
        return float(x)

    def integer(self, v: Any, path: str, *, lo: int, hi: int,
                strings: bool = False, what: str = "an integer") -> int:
        """A whole number in [lo, hi] (``4.0`` and, with ``strings``, ``"8e9"`` count as whole)."""
        x = self.number(v, path, lo=lo, hi=hi, strings=strings, what=what)
        if x != int(x) or (isinstance(v, float) and abs(x) >= 2**53):
            self.fail(path, f"expected {what}, got {_kind(v)} {shown(v)}")
        return int(v) if isinstance(v, int) else int(x)

    def size(self, v: Any, path: str, *, lo: int = 1, hi: int = MAX_BYTES) -> int:
        """Bytes: a number, or a string with a unit (``"2 GB"``, ``"512MiB"``; B, KB, MB, GB, TB
        are powers of 1000, KiB, MiB, GiB, TiB of 1024), in [lo, hi]."""
        x = v
        if isinstance(v, str):
            m = _SIZE_RE.match(v)
            if not m:
                self.fail(path, f"expected bytes or a size like {SIZE_EXAMPLE}, got {shown(v)}")
            scale = SIZE_UNITS.get(m.group(2).lower() or "b")
            if scale is None:
                self.fail(path, f"unknown unit {m.group(2)!r} in {shown(v)}: use B, KB, MB, GB, TB "
                                "(powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
            x = float(m.group(1)) * scale
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(path, f"expected bytes or a size like {SIZE_EXAMPLE}, got {shown(v)}")
        if not math.isfinite(x) or x < lo or x > hi:
            self.fail(path, f"expected bytes{_interval(lo, hi, False, False)}, got {shown(v)}"
                            + ("" if math.isfinite(x) else " (not a finite number)"))
        return int(x)

    def address(self, v: Any, path: str, schemes: Sequence[str] = ("tcp://",)) -> str:
        """A ZeroMQ endpoint such as ``tcp://HOST:PORT``."""
        if not isinstance(v, str) or not v.startswith(tuple(schemes)):
            self.fail(path, f"expected a tcp://HOST:PORT address, got {shown(v)}")
        return v

    def path(self, v: Any, where: str) -> str:
        """A file or directory path; ``~`` and ``$VARS`` expand (``${CREDENTIALS_DIRECTORY}``
        under systemd's ``LoadCredential=``)."""
        return os.path.expandvars(os.path.expanduser(self.string(v, where)))


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
        raise error(f"{path}: not valid YAML ({_cut(str(e))})") from None


def _cut(text: str, limit: int = 4 * MAX_ECHO) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
