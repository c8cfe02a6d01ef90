"""What the command groups share: the CLI's own errors, argument types and helpers (--keys, --kwargs, inputs, progress bar)."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from edgezmq.argtypes import (
    MAX_COUNT,
    MAX_SEED,
    MAX_WINDOW,
    count,
    count_or_zero,
    microbatch,
    seconds,
    seed,
    window,
)
from edgezmq.errors import EdgezmqError
from edgezmq.terms import GRANULARITIES, MAX_MICROBATCH, MAX_SECONDS

FMT = argparse.RawDescriptionHelpFormatter
KEYS_HELP = ("plan or cluster inventory whose keys: section to use: CurveZMQ to its nodes, "
             "which may then be given by name (plans/README.md)")
PROGRESS_WIDTH = 30  # characters of the bar


class UsageError(EdgezmqError, ValueError):
    """A command-line argument that cannot be used; the message names the flag."""


class CommandFailed(EdgezmqError, RuntimeError):
    """A command's operation failed where the library reports it with a builtin (see :func:`node_failures`)."""


Command = Callable[[argparse.Namespace], int]


def node_failures(fn: Command) -> Command:
    """A command that talks to nodes or a pipeline: a timeout or a socket that cannot bind is
    its operation failing (exit 1, one line), not a bug.  client.py and transport/netprobe.py
    still raise ``TimeoutError`` for these and zmq raises ``ZMQError`` (e.g. an address in use)."""
    import zmq

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (TimeoutError, zmq.ZMQError) as e:
            raise CommandFailed(str(e)) from e

    return run


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def json_object(flag: str, text: str | None) -> dict[str, Any]:
    """A flag's JSON object (``--kwargs '{"img_size": 64}'``); {} when not given."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise UsageError(f"{flag}: expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: expected a JSON object, got {type(value).__name__} {text!r}")
    return value


def model_kwargs(text: str | None) -> dict[str, Any]:
    """``--kwargs``: a JSON object of the architecture arguments a node accepts
    (``edgezmq.protocol.model_kwargs.ALLOWED``), each in its range; ModelKwargsError names the key."""
    from edgezmq.protocol.model_kwargs import check_model_kwargs

    return check_model_kwargs(json_object("--kwargs", text), "--kwargs")


def add_model_args(p: argparse._ActionsContainer, *, model_required: bool = True) -> None:
    """--model/--microbatch/--granularity/--kwargs, as every model-taking command spells them."""
    p.add_argument("--model", required=model_required, help="timm model name")
    p.add_argument("--microbatch", type=microbatch, default=8, help=f"samples per microbatch (1..{MAX_MICROBATCH})")
    p.add_argument("--granularity", default="block", choices=GRANULARITIES)
    p.add_argument("--kwargs", help="architecture arguments of timm.create_model as JSON, e.g. "
                   "'{\"depth\": 4}' (the allowed ones: docs/security.md)")


# ---- --keys: a node by name, with the file's CurveZMQ keys ---------------------------------
def node_arg(flag: str, value: str, keys_file: str | None):
    """A node given on the command line: a control address, or with ``--keys FILE`` a node of
    that plan or inventory (by name or address), reached with the file's keys."""
    from edgezmq.ops.status import targets
    from edgezmq.orchestrate.address import NodeAddress

    if keys_file is None:
        if not value.startswith("tcp://"):
            raise UsageError(f"{flag}: expected a tcp://HOST:PORT control address, got {value!r} "
                             "(a node name needs --keys PLAN_OR_CLUSTER.yaml)")
        return NodeAddress(value, value)
    _, nodes, _ = targets(keys_file)
    if not any(t.curve is not None for t in nodes):
        raise UsageError(f"--keys {keys_file}: the file has no keys: section (plans/README.md)")
    for t in nodes:
        if value in (t.name, t.control):
            return t
    raise UsageError(f"{flag}: {value!r} is not a node of {keys_file} "
                     f"(its nodes: {', '.join(f'{t.name} {t.control}' for t in nodes)})")


# ---- inputs and results of `submit` and `run` ------------------------------------------------
def add_io_args(p: argparse.ArgumentParser) -> None:
    """Inputs, outputs and flow control shared by `submit` and `run`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="directory of JPEG/PNG images (timm preprocessing)")
    src.add_argument("--npy", help=".npy file of shape (N, C, H, W)")
    src.add_argument("--random", type=count, metavar="N",
                     help=f"N random images, or token sequences for a text model (1..{MAX_COUNT})")
    src.add_argument("--text", metavar="FILE", help="a text model's input: one sequence per line (tokenized "
                     "with --tokenizer, else the model's tokenizer from the local Hugging Face cache)")
    src.add_argument("--tokens", metavar="FILE.npy", help="a text model's input as token ids, "
                     "integer .npy of shape (N, S); padding is id 0")
    p.add_argument("--tokenizer", metavar="PATH", help="for --text: a tokenizer directory or a WordPiece vocab.txt")
    p.add_argument("--seed", type=seed, default=0, help=f"of --random (0..{MAX_SEED})")
    p.add_argument("--out", default="logits.npy", help="where to write the logits")
    p.add_argument("--window", type=window, default=None,
                   help=f"microbatches in flight (1..{MAX_WINDOW}; default: the plan's predicted.window, "
                        f"enough to keep its pipeline full, else 2 per node + 2)")
    p.add_argument("--timeout", type=seconds, default=120.0,
                   help=f"seconds per microbatch before retry/failure (up to {MAX_SECONDS:g})")
    p.add_argument("--show", type=count_or_zero, default=5, help="print top-5 classes of this many samples")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def inputs(args: argparse.Namespace, model) -> tuple:
    """The inputs from --random/--npy/--images (an image model: float32 (N, C, H, W)) or
    --random/--text/--tokens (a text model: its three int64 (N, S) arrays), for a ModelSpec; and
    the samples' names."""
    import numpy as np

    from edgezmq.model import chain as models
    from edgezmq.model import text

    if text.is_text_model(model.name):
        return _text_inputs(args, model)
    if args.text is not None or args.tokens is not None:
        raise UsageError(f"--{'text' if args.text is not None else 'tokens'}: {model.name} is an image model "
                         "(--images, --npy or --random)")
    if args.random is not None:
        return models.random_inputs(model.name, args.random, args.seed, **model.kwargs), None
    if args.npy is not None:
        try:
            x = np.load(args.npy, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise UsageError(f"--npy {args.npy}: cannot read a .npy array ({type(e).__name__}: {e})"[:300]) from None
        return check_images(x, f"--npy {args.npy}"), None
    from edgezmq.model.images import load_images

    try:
        return load_images(args.images, model.name, **model.kwargs)
    except (OSError, ValueError) as e:  # images.py says which: not a directory, no images, an unreadable file
        raise UsageError(str(e)) from None


def _text_inputs(args: argparse.Namespace, model) -> tuple:
    import numpy as np

    from edgezmq.model import chain as models
    from edgezmq.model import text

    if args.images is not None or args.npy is not None:
        raise UsageError(f"--{'images' if args.images is not None else 'npy'}: {model.name} is a text model "
                         "(--text, --tokens or --random)")
    try:
        m = models.create_model(model.name, device="meta", **model.kwargs)
        seq, vocab = text.seq_len(m), text.vocab_size(m)
        if args.random is not None:
            return text.model_inputs(m, text.random_inputs(vocab, args.random, seq, args.seed)), None
        if args.tokens is not None:
            try:
                ids = np.load(args.tokens, allow_pickle=False)
            except (OSError, ValueError, EOFError) as e:
                raise UsageError(f"--tokens {args.tokens}: cannot read a .npy array ({type(e).__name__}: {e})"[:300]) from None
            return text.model_inputs(m, text.token_inputs(ids, seq, vocab, f"--tokens {args.tokens}")), None
        try:
            with open(args.text, encoding="utf-8") as f:
                lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--text {args.text}: cannot read ({type(e).__name__}: {e})"[:300]) from None
        if not lines:
            raise UsageError(f"--text {args.text}: no non-empty line")
        tok = text.load_tokenizer(model.name, args.tokenizer)
        names = [ln if len(ln) <= 40 else ln[:37] + "..." for ln in lines]
        return text.model_inputs(m, text.encode_texts(lines, tok, seq, vocab, f"--text {args.text}")), names
    except (models.ModelError, text.TextModelError) as e:  # the model, or inputs it cannot take
        raise UsageError(str(e)) from None


def check_images(x: Any, what: str) -> Any:
    """Input images as float32 (N, C, H, W), or UsageError naming `what`: a real number type only
    (a complex or object array is not silently cast), finite values only (a NaN gives NaN logits)."""
    import numpy as np

    if not isinstance(x, np.ndarray) or x.dtype.kind not in "fiub":
        raise UsageError(f"{what}: expected real numbers, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or 0 in x.shape:
        raise UsageError(f"{what}: expected images of shape (N, C, H, W) or (C, H, W), got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise UsageError(f"{what}: {int((~np.isfinite(x)).sum())} value(s) are NaN or infinite")
    return x


def npy_path(path: str) -> str:
    """Where ``np.save(path)`` writes: it appends .npy to a name without it."""
    return path if path.endswith(".npy") else path + ".npy"


def progress_bar(total: int, label: str = "", stream: Any = None):
    """A callback(done, samples) that draws a one-line progress bar on `stream` (default: the
    sys.stderr of the moment it is made, not of the moment this module was imported)."""
    stream = sys.stderr if stream is None else stream
    t0 = time.time()

    def update(done: int, samples: int) -> None:
        filled = int(PROGRESS_WIDTH * done / max(total, 1))
        rate = samples / max(time.time() - t0, 1e-9)
        stream.write(f"\r{label}[{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}] {done}/{total} "
                     f"batches  {rate:.1f} samples/s")
        if done >= total:
            stream.write("\n")
        stream.flush()

    return update


def collect(args: argparse.Namespace, stream: Iterator, n_batches: int, names) -> int:
    """Drain a result stream with a progress bar; write the logits; print top-5."""
    import numpy as np

    from edgezmq.model.images import top5

    bar = progress_bar(n_batches) if not args.quiet else None
    outs, samples = [], 0
    t0 = time.time()
    for y in stream:
        outs.append(y)
        samples += len(y)
        if bar:
            bar(len(outs), samples)
    dt = time.time() - t0
    logits = np.concatenate(outs)
    out = npy_path(args.out)
    try:
        np.save(out, logits)
    except OSError as e:
        raise UsageError(f"--out {args.out}: cannot write ({e.strerror or e})") from None
    print(f"{len(logits)} samples in {dt:.2f}s ({len(logits) / dt:.2f} samples/s); logits -> {out}")
    # a classifier's (N, classes); a language model's (N, S, vocabulary) logits: no top-5 classes
    for i, row in enumerate(top5(logits)[: args.show] if logits.ndim == 2 else []):
        label = names[i] if names else f"sample {i}"
        print(f"{label}: " + ", ".join(f"{cls} ({p:.3f})" for cls, p in row))
    return 0

