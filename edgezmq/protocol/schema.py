"""Typed message definitions: documented fields on frozen dataclasses, checked when parsed (pure).

A message is a frozen dataclass whose fields are declared with ``field_(doc, ...)``:
the annotation is the wire type, the metadata says what the field means, its unit,
and — for every number — the finite range a parser accepts.  ``from_wire`` turns a
msgpack map into the dataclass (checking names, types and ranges), ``to_wire`` turns it
back.  The docs' tables are generated from the same definitions (edgezmq.protocol.docs).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any, ClassVar, TypeVar, Union

from edgezmq.errors import EdgezmqError

# A msgpack value as it crosses the wire: what the protocol carries where it is free-form.
JSON = Union[None, bool, int, float, str, list["JSON"], dict[str, "JSON"]]  # noqa: UP007 - a recursive alias needs Union[] at runtime
JSONMap = dict[str, JSON]

MAX_DEPTH = 32  # nesting of free-form JSON values


class SchemaError(EdgezmqError, ValueError):
    """A field that does not match its definition; ``path`` names it (``load.microbatch``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


@dataclass(frozen=True)
class Meta:
    """What a field means: doc, unit, accepted range (numbers) or length (strings, lists)."""

    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # (lo, hi] instead of [lo, hi]
    unit: str = ""
    max_len: int | None = None
    choices: tuple[str, ...] = ()
    default_doc: str = ""  # how the default reads in the docs when it is not a literal

    def range_text(self) -> str:
        if self.lo is None and self.hi is None:
            return ""
        lo = "" if self.lo is None else _num(self.lo)
        hi = "" if self.hi is None else _num(self.hi)
        return f"({lo}, {hi}]" if self.lo_open else f"{lo}..{hi}"


def _num(x: float) -> str:
    if isinstance(x, int) and x >= 1 << 20 and x % 1024 == 0:
        for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
            if x % size == 0:
                return f"{x // size} {unit}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def field_(doc: str, *, default: Any = MISSING, factory: Any = MISSING, lo: float | None = None,
           hi: float | None = None, lo_open: bool = False, unit: str = "", max_len: int | None = None,
           choices: tuple[str, ...] = (), default_doc: str = "") -> Any:
    """A documented message field; without ``default``/``factory`` it is required."""
    meta = Meta(doc, lo, hi, lo_open, unit, max_len, choices, default_doc)
    if factory is not MISSING:
        return dataclasses.field(default_factory=factory, metadata={"wire": meta})
    return dataclasses.field(default=default, metadata={"wire": meta})


@dataclass(frozen=True)
class FieldDef:
    name: str
    type: Any
    meta: Meta
    required: bool
    default: Any


class Record:
    """Base of every typed message; subclasses are frozen dataclasses of ``field_``s."""

    WIRE_NAME: ClassVar[str] = ""  # how errors and docs name it (`load`, `stats.stage`)

    @classmethod
    def fields(cls) -> list[FieldDef]:
        return _fields(cls)

    @classmethod
    def from_wire(cls: type[M], data: Mapping[str, Any], *, strict: bool = True, path: str = "") -> M:
        """Map -> message.  ``strict``: unknown names are refused (requests); replies are read
        leniently (a newer node may add fields) but what is known is checked all the same."""
        where = path or cls.WIRE_NAME or cls.__name__
        if not isinstance(data, Mapping):
            raise SchemaError(where, f"expected a map, got {_tname(data)}")
        defs = cls.fields()
        if strict:
            unknown = sorted(str(k) for k in data if k not in {f.name for f in defs})
            if unknown:
                raise SchemaError(where, f"unknown field(s) {unknown}; expected {sorted(f.name for f in defs)}")
        kw: dict[str, Any] = {}
        for f in defs:
            if f.name not in data:
                if f.required:
                    raise SchemaError(f"{where}.{f.name}", f"missing ({f.meta.doc})")
                continue
            kw[f.name] = _check(f.type, data[f.name], f"{where}.{f.name}", f.meta, strict)
        return cls(**kw)

    def to_wire(self) -> JSONMap:
        """Record -> a map of plain msgpack values (nested messages become maps)."""
        return {f.name: _plain(getattr(self, f.name)) for f in self.fields()}


M = TypeVar("M", bound=Record)


_FIELDS: dict[type, list[FieldDef]] = {}


def _fields(cls: type) -> list[FieldDef]:
    if cls not in _FIELDS:
        _FIELDS[cls] = _read_fields(cls)
    return _FIELDS[cls]


def _read_fields(cls: type) -> list[FieldDef]:
    hints = typing.get_type_hints(cls, globalns=_namespace(cls))
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("wire")
        if meta is None:
            raise TypeError(f"{cls.__name__}.{f.name}: declare message fields with field_()")
        required = f.default is MISSING and f.default_factory is MISSING
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        out.append(FieldDef(f.name, hints[f.name], meta, required, default))
    return out


def _namespace(cls: type) -> dict[str, Any]:
    import sys

    ns = dict(vars(sys.modules[cls.__module__]))
    ns.setdefault("JSON", JSON)
    return ns


def _tname(v: Any) -> str:
    return "nil" if v is None else type(v).__name__


def type_text(tp: Any) -> str:
    """A wire type as the docs write it: int, str | null, [str], {str: JSON}, a message's name."""
    if _is_json(tp):
        return "JSON"
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        if issubclass(tp, Record):
            return tp.WIRE_NAME or tp.__name__
        return {"bool": "bool", "int": "int", "float": "float", "str": "str"}.get(tp.__name__, tp.__name__)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is list:
        return f"[{type_text(args[0])}]"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"[{type_text(args[0])}]"
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is dict:
        return f"{{str: {type_text(args[1])}}}"
    return str(tp)


def _check(tp: Any, v: Any, path: str, meta: Meta | None, strict: bool) -> Any:
    """v checked against the annotation ``tp`` (and the field's range); returns the typed value."""
    if _is_json(tp):
        _check_json(v, path, 0)
        return v
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(a, v, path, meta, strict)
            except SchemaError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise SchemaError(path, f"expected {type_text(tp)}, got {_tname(v)}")
    if origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            raise SchemaError(path, f"expected {type_text(tp)}, got {_tname(v)}")
        if meta is not None and meta.max_len is not None and len(v) > meta.max_len:
            raise SchemaError(path, f"at most {meta.max_len} entries, got {len(v)}")
        each = dataclasses.replace(meta, max_len=None) if meta is not None else None
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(v) != len(args):
                raise SchemaError(path, f"expected {type_text(tp)} ({len(args)} entries), got {len(v)} entries")
            return tuple(_check(a, x, f"{path}[{i}]", each, strict) for i, (a, x) in enumerate(zip(args, v)))
        items = [_check(args[0], x, f"{path}[{i}]", each, strict) for i, x in enumerate(v)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            raise SchemaError(path, f"expected a map with string keys, got {_tname(v)}")
        return {k: _check(args[1], x, f"{path}.{k}", None, strict) for k, x in v.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_wire(v, strict=strict, path=path)
    if tp is bool:
        if not isinstance(v, bool):
            raise SchemaError(path, f"expected bool, got {_tname(v)}")
        return v
    if tp in (int, float):
        ok = isinstance(v, int) if tp is int else isinstance(v, (int, float))
        if not ok or isinstance(v, bool) or (isinstance(v, float) and not math.isfinite(v)):
            got = repr(v) if isinstance(v, float) else _tname(v)
            raise SchemaError(path, f"expected {'int' if tp is int else 'a finite number'}, got {got}"[:200])
        if meta is not None and not _in_range(v, meta):
            raise SchemaError(path, f"expected {meta.range_text()}, got {v!r}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise SchemaError(path, f"expected str, got {_tname(v)}")
        if meta is not None and meta.max_len is not None and len(v) > meta.max_len:
            raise SchemaError(path, f"at most {meta.max_len} characters, got {len(v)}")
        if meta is not None and meta.choices and v not in meta.choices:
            raise SchemaError(path, f"expected one of {list(meta.choices)}, got {v!r}"[:300])
        return v
    if tp is type(None):
        if v is not None:
            raise SchemaError(path, f"expected nil, got {_tname(v)}")
        return None
    raise TypeError(f"{path}: unsupported wire type {tp!r}")


_SCALARS = {type(None), bool, int, float, str}


def _is_json(tp: Any) -> bool:
    """The JSON alias, also as typing.get_type_hints expands it (one level unrolled)."""
    if tp is JSON or tp == JSON:
        return True
    args = typing.get_args(tp)
    if typing.get_origin(tp) not in (Union, types.UnionType):
        return False
    scalars = {a for a in args if isinstance(a, type)}
    return scalars == _SCALARS and {typing.get_origin(a) for a in args} >= {list, dict}


def _in_range(v: float, meta: Meta) -> bool:
    if meta.lo is not None and (v <= meta.lo if meta.lo_open else v < meta.lo):
        return False
    return meta.hi is None or v <= meta.hi


def _check_json(v: Any, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise SchemaError(path, f"nested deeper than {MAX_DEPTH}")
    if v is None or isinstance(v, (bool, int, str)):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise SchemaError(path, f"expected a finite number, got {v!r}")
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_json(x, f"{path}[{i}]", depth + 1)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise SchemaError(path, f"map keys must be strings, got {_tname(k)}")
            _check_json(x, f"{path}.{k}", depth + 1)
        return
    raise SchemaError(path, f"expected a msgpack value, got {_tname(v)}")


def _plain(v: Any) -> Any:
    if isinstance(v, Record):
        return v.to_wire()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v
