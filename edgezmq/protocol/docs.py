"""Generate the protocol tables of docs/control.md, docs/wire.md and docs/compression.md from protocol/ (``--check``: compare only).

Each table sits between ``<!-- BEGIN GENERATED name -->`` and ``<!-- END GENERATED name -->``;
the prose around the markers is hand-written and left alone.  Usage::

    python -m edgezmq.protocol.docs            # rewrite the blocks
    python -m edgezmq.protocol.docs --check    # exit 1 when a block differs (tests run this)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from edgezmq.protocol import codecs, control, wire
from edgezmq.protocol import messages as m
from edgezmq.protocol.schema import MISSING, FieldDef, Record, type_text

DOCS = Path(__file__).resolve().parents[2] / "docs"
BEGIN = "<!-- BEGIN GENERATED {} -->"
END = "<!-- END GENERATED {} -->"
NESTED = (m.DeviceFacts, m.StageStats, m.UnitDesc, m.TensorSpec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(f: FieldDef) -> str:
    if f.required:
        return "**required**"
    if f.meta.default_doc:
        return f"default: {f.meta.default_doc}"
    d = f.default
    if d is MISSING:
        return "optional"
    text = "null" if d is None else str(d).lower() if isinstance(d, bool) else (
        f"`{d}`" if isinstance(d, str) else str(d))
    if isinstance(d, int) and not isinstance(d, bool) and d >= 1 << 20 and d % (1 << 20) == 0:
        text = f"{d >> 20} MiB"
    return f"default {text}"


def _limits(f: FieldDef) -> str:
    parts = []
    if f.meta.range_text():
        parts.append(f.meta.range_text())
    if f.meta.unit:
        parts.append(f.meta.unit)
    if f.meta.max_len is not None:
        parts.append(f"≤ {f.meta.max_len} {'entries' if type_text(f.type).startswith('[') else 'chars'}")
    if f.meta.choices:
        parts.append(" \\| ".join(f"`{c}`" for c in f.meta.choices))
    return ", ".join(parts) or "–"


def argument_table(cls: type[Record]) -> list[str]:
    rows = ["| argument | type | required / default | range, unit | meaning |", "|---|---|---|---|---|"]
    for f in cls.fields():
        rows.append(f"| `{f.name}` | {_cell(type_text(f.type))} | {_default(f)} | {_limits(f)} | {_cell(f.meta.doc)} |")
    return rows


def field_table(cls: type[Record]) -> list[str]:
    rows = ["| field | type | unit | meaning |", "|---|---|---|---|"]
    for f in cls.fields():
        rows.append(f"| `{f.name}` | {_cell(type_text(f.type))} | {f.meta.unit or '–'} | {_cell(f.meta.doc)} |")
    return rows


def commands_block() -> list[str]:
    rows = ["| command | what it does | client timeout | sent again (same arguments) |", "|---|---|---|---|"]
    for name, c in control.COMMANDS.items():
        rows.append(f"| [`{name}`](#{name}) | {_cell(' '.join((c.request.__doc__ or '').split()))} | "
                    f"{c.timeout_s:g} s | {_cell(c.resend)} |")
    return rows


def header_block() -> list[str]:
    return [
        "| field | type | required | meaning |", "|---|---|---|---|",
        f"| `v` | int | **required** | protocol version, {control.VERSION} |",
        "| `cmd` | str | **required** | the command (table above) |",
        f"| `rid` | str | optional | request id, 1..{m.MAX_RID} chars, unique per request (a UUID): a node "
        f"remembers the replies of the last {m.REPLIES_KEPT} ids and answers a repeat of an id with the "
        "reply it gave, without executing it again; the same id with different content is `bad_request` |",
    ]


def per_command_block() -> list[str]:
    out: list[str] = []
    for name, c in control.COMMANDS.items():
        out += [f"### `{name}`", "", " ".join((c.request.__doc__ or "").split()), ""]
        out += (argument_table(c.request) if c.request.fields() else ["No arguments."]) + [""]
        out += ["Reply:", ""] + field_table(c.reply) + [""]
    for cls in NESTED:
        out += [f"### `{cls.WIRE_NAME}`", ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [" ".join(cls.__doc__.split()), ""]
        out += field_table(cls) + [""]
    return out[:-1]


def errors_block() -> list[str]:
    rows = ["| code | when |", "|---|---|"]
    rows += [f"| `{code}` | {_cell(when)} |" for code, when in control.ERRORS.items()]
    rows += [f"| `{code}` | {_cell(when)} |" for code, when in control.CLIENT_ERRORS.items()]
    return rows


def wire_header_block() -> list[str]:
    rows = ["| field | type | required | meaning |", "|---|---|---|---|"]
    rows += [f"| `{f.name}` | {_cell(f.type)} | {'**required**' if f.required else 'optional'} | {_cell(f.doc)} |"
             for f in wire.HEADER]
    return rows


def wire_limits_block() -> list[str]:
    return [
        f"- **dtypes** allowed: {', '.join(sorted(wire.DTYPES))}. `enc` is one of "
        f"{', '.join(f'`{e}`' for e in wire.ENCODINGS)} (below); a non-raw `enc` carries "
        f"`{codecs.ENCODED_DTYPE}` tensors only.",
        f"- **Zero-copy**: buffers of {wire.COPY_THRESHOLD // 1024} KiB or more are handed to libzmq "
        "without copying (`copy=False`); smaller ones are copied (below that, copying costs less than "
        "tracking the buffer: bench/transport.py).",
        f"- **Limits**: header ≤ {wire.MAX_HEADER_BYTES // 1024} KiB, ≤ {wire.MAX_TENSORS} tensors, "
        f"≤ {wire.MAX_NDIM} dimensions, ≤ {wire.MAX_TENSOR_BYTES >> 20} MiB per tensor (declared size checked "
        f"before anything is allocated), ≤ {wire.MAX_TIMESTAMPS} timestamp entries, texts ≤ "
        f"{wire.MAX_TEXT} bytes.",
    ]


ENC_LAYOUT = {
    "raw": ("the tensor's bytes as they are: n x itemsize", "–",
            "`np.frombuffer(frame, dtype).reshape(shape)`, no copy"),
    "f16": ("n IEEE binary16 (2 bytes each)", "–", "widen to float32 (exact)"),
    "bf16": ("n uint16: the upper 16 bits of each float32, rounded to nearest even (NaN kept a quiet NaN)",
             "–", "`uint32(v) << 16`, read as float32 (exact)"),
    "int8": ("n int8 in -127..127 (-128 is decoded like any other value)",
             "G float32 scales: `token`: G = prod(shape[:-1]), scale of row r = elements r*C .. r*C+C-1 "
             "(C = shape[-1]); `channel`: G = C, scale of element i is scales[i mod C]",
             "value = float32(int8) x its scale, a float32 multiply; every scale finite and >= 0, else `bad_encoding`"),
    "int4": ("ceil(n/2) bytes, two 4-bit two's-complement values each: element 2k in the low nibble "
             "(bits 0-3), element 2k+1 in the high nibble (bits 4-7); an odd n leaves the last high "
             "nibble 0 (ignored); values -7..7 (-8 decoded like any other)",
             "as `int8`", "value = nibble (sign-extended) x its scale"),
}


def wire_encodings_block() -> list[str]:
    rows = ["| `enc` | frames | payload frame (n = prod(shape) elements, C order) | scales frame | decoding |",
            "|---|---|---|---|---|"]
    for enc, frames in codecs.WIRE_ENCODINGS.items():
        payload, scales, how = ENC_LAYOUT[enc]
        rows.append(f"| `{enc}` | {frames} | {_cell(payload)} | {_cell(scales)} | {_cell(how)} |")
    return rows


def codecs_block() -> list[str]:
    shape = (8, 197, 768)
    rows = ["| encoding | `enc` on the wire | `scale` | bits / value | wire bytes / raw, ViT-Base at microbatch 8 "
            f"{list(shape)} | what it is |", "|---|---|---|---|---|---|"]
    for name in codecs.NAMES:
        c = codecs.CODECS[name]
        rows.append(f"| `{name}` | `{c.enc}` | {f'`{c.scale}`' if c.scale else '–'} | {c.bits} | "
                    f"{codecs.ratio(name, shape):.4f} | {_cell(c.describe())} |")
    return rows


def wire_errors_block() -> list[str]:
    rows = ["| code | when |", "|---|---|"]
    rows += [f"| `{code}` | {_cell(when)} |" for code, when in wire.ERRORS.items()]
    return rows


BLOCKS: dict[str, dict[str, Callable[[], list[str]]]] = {
    "control.md": {"commands": commands_block, "request-header": header_block,
                   "per-command": per_command_block, "errors": errors_block},
    "wire.md": {"header": wire_header_block, "limits": wire_limits_block, "encodings": wire_encodings_block,
                "errors": wire_errors_block},
    "compression.md": {"codecs": codecs_block},
}


def render(text: str, blocks: dict[str, Callable[[], list[str]]], where: str) -> str:
    """``text`` with every generated block rewritten; a block missing its markers is an error."""
    for name, make in blocks.items():
        begin, end = BEGIN.format(name), END.format(name)
        a, b = text.find(begin), text.find(end)
        if a < 0 or b < a:
            raise ValueError(f"{where}: expected the markers {begin} ... {end}, not found")
        text = text[:a + len(begin)] + "\n" + "\n".join(make()) + "\n" + text[b:]
    return text


def stale(docs: Path = DOCS) -> list[str]:
    """Names of the docs whose generated blocks differ from what ``render`` writes."""
    out = []
    for name, blocks in BLOCKS.items():
        path = docs / name
        text = path.read_text()
        if render(text, blocks, str(path)) != text:
            out.append(str(path))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgezmq.protocol.docs", description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a doc is stale")
    ap.add_argument("--docs", type=Path, default=DOCS, help="the docs directory (default: the repository's)")
    args = ap.parse_args(argv)
    if args.check:
        bad = stale(args.docs)
        for p in bad:
            print(f"{p}: generated tables are stale; run python -m edgezmq.protocol.docs", file=sys.stderr)
        return 1 if bad else 0
    for name, blocks in BLOCKS.items():
        path = args.docs / name
        text = path.read_text()
        new = render(text, blocks, str(path))
        if new != text:
            path.write_text(new)
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
