"""A real classification task to measure accuracy on without a hub: a small timm ViT trained
here on scikit-learn's digits (upsampled), its checkpoint cached as safetensors.

    python -m edgezmq.model.task            # train once (a few CPU minutes), then reuse; --help

    >>> path = cached_task_checkpoint()                 # trains on first use, then read from the cache
    >>> model = load_task_model(path)                   # the whole model, eval mode
    >>> split = digits_split()                          # the fixed seeded train/test split
    >>> shard = build_shard(TASK_MODEL, 0, 3, checkpoint=path, **TASK_KWARGS)   # the chain takes it as is

The digits are 1,797 8x8 grey images of 0-9 (UCI, shipped inside scikit-learn). They are
scaled bilinearly to IMG_SIZE px, copied to 3 channels and normalised to [-1, 1]; a
stratified split keeps TEST_FRACTION of each class for the test set, drawn by numpy's
legacy RandomState (its streams are frozen across numpy versions), so the split is the same
everywhere. Training is seeded and runs on a fixed number of threads: on one machine and
torch version a rerun gives the same bits. The cache key covers everything that shapes the
weights (model, kwargs, split, recipe, threads), so a changed recipe trains anew.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from edgezmq import argtypes
from edgezmq.errors import EdgezmqError
from edgezmq.model.chain import checkpoint_problem, create_model, save_checkpoint, torch_threads
from edgezmq.paths import checkpoints_dir
from edgezmq.terms import MAX_THREADS

__all__ = ["TASK_MODEL", "TASK_KWARGS", "TrainConfig", "Split", "TaskError", "load_digits",
           "split_indices", "prepare", "digits_split", "train", "top1", "task_checkpoint_path",
           "cached_task_checkpoint", "load_task_model", "task_info"]

log = logging.getLogger(__name__)

TASK = "digits"
# timm's ViT-Tiny (192 wide, 3 heads) cut down to 4 blocks on 32 px images in 8 px patches:
# 16 tokens of 2x2 original pixels. Average pooling instead of a class token: on 1,347
# training images it learns in half the epochs.
TASK_MODEL = "vit_tiny_patch16_224"
TASK_KWARGS: dict[str, Any] = {"img_size": 32, "patch_size": 8, "depth": 4, "num_classes": 10,
                               "global_pool": "avg", "class_token": False}
IMG_SIZE = 32
NUM_CLASSES = 10
DIGIT_LEVELS = 16.0  # the digits' pixels are counts 0..16
TEST_FRACTION = 0.25
SPLIT_SEED = 0
KEY_CHARS = 12
EVAL_BATCH = 64
MAX_EPOCHS = 10_000
SKLEARN_HINT = "pip install -e '.[task]' (or pip install scikit-learn)"


class TaskError(EdgezmqError, RuntimeError):
    """The task cannot run here: scikit-learn missing, or a checkpoint that is not the task's."""


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; every field is part of the checkpoint's cache key."""

    epochs: int = 40
    batch: int = 64
    lr: float = 1e-3  # peak of a one-cycle schedule (linear warm-up, cosine decay)
    warmup: float = 0.1  # fraction of the steps spent warming up
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    shift: int = 2  # augmentation: each batch rolled by up to this many pixels each way
    seed: int = 0
    threads: int = 1  # fixed: another thread count sums in another order (other bits)

    def __post_init__(self) -> None:
        for name, lo, hi in (("epochs", 1, MAX_EPOCHS), ("batch", 1, 4096), ("shift", 0, IMG_SIZE // 2),
                             ("seed", 0, argtypes.MAX_SEED), ("threads", 1, MAX_THREADS)):
            v = getattr(self, name)
            if not (isinstance(v, int) and lo <= v <= hi):
                raise ValueError(f"TrainConfig.{name}: expected an integer in [{lo}, {hi}], got {v!r}")
        for name, flo, fhi in (("lr", 1e-7, 1.0), ("warmup", 0.0, 1.0), ("weight_decay", 0.0, 1.0),
                               ("label_smoothing", 0.0, 1.0)):
            x = getattr(self, name)
            if not (isinstance(x, float | int) and flo <= x <= fhi):
                raise ValueError(f"TrainConfig.{name}: expected a number in [{flo}, {fhi}], got {x!r}")


@dataclass(frozen=True)
class Split:
    """Prepared images (N, 3, IMG_SIZE, IMG_SIZE) float32 and labels (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float32 in [0, 1] and labels (1797,) int64."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise TaskError(f"the digits task needs scikit-learn, which is not installed: {SKLEARN_HINT}") from None
    d = sk_load_digits()
    return (np.asarray(d.images, dtype=np.float32) / DIGIT_LEVELS), np.asarray(d.target, dtype=np.int64)


def split_indices(labels: np.ndarray, test_fraction: float = TEST_FRACTION,
                  seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, sorted: round(test_fraction * n_c) of each class c go to test."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a number in (0, 1), got {test_fraction}")
    rs = np.random.RandomState(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rs.shuffle(idx)
        test.append(idx[:round(len(idx) * test_fraction)])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def prepare(images: np.ndarray, size: int = IMG_SIZE) -> torch.Tensor:
    """(N, h, w) in [0, 1] -> (N, 3, size, size) in [-1, 1], scaled bilinearly."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def digits_split(test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED,
                 size: int = IMG_SIZE) -> Split:
    """The fixed train/test split of the digits, prepared for the task's model."""
    images, labels = load_digits()
    tr, te = split_indices(labels, test_fraction, seed)
    y = torch.from_numpy(labels)
    return Split(prepare(images[tr], size), y[tr], prepare(images[te], size), y[te])


@torch.no_grad()
def top1(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = EVAL_BATCH) -> float:
    """Top-1 accuracy in percent of `model` (put in eval mode) on (x, y)."""
    model.eval()
    hits = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return 100.0 * hits / len(y)


def train(config: TrainConfig, split: Split,
          progress: Callable[[int, float], None] | None = None) -> torch.nn.Module:
    """A freshly initialised TASK_MODEL trained on split's training set; eval mode on return.

    `progress(epoch, loss)` is called after each epoch. The global RNG is left as it was.
    """
    steps = config.epochs * math.ceil(len(split.y_train) / config.batch)
    with torch_threads(config.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = create_model(TASK_MODEL, **TASK_KWARGS).train()
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=steps,
                                                    pct_start=config.warmup)
        gen = torch.Generator().manual_seed(config.seed)
        for epoch in range(config.epochs):
            model.train()
            perm = torch.randperm(len(split.y_train), generator=gen)
            loss = torch.zeros(())
            for i in range(0, len(perm), config.batch):
                idx = perm[i:i + config.batch]
                xb = split.x_train[idx]
                if config.shift:  # a random translation; the digits' borders are background
                    dy, dx = torch.randint(-config.shift, config.shift + 1, (2,), generator=gen).tolist()
                    xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(model(xb), split.y_train[idx], label_smoothing=config.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if progress is not None:
                progress(epoch, float(loss.detach()))
    return model.eval().requires_grad_(False)


def _want(config: TrainConfig) -> dict[str, str]:
    """The metadata a cached checkpoint must carry to be this recipe's."""
    return {"task": TASK, "model": TASK_MODEL, "seed": str(config.seed),
            "kwargs": json.dumps(TASK_KWARGS, sort_keys=True),
            "split": json.dumps({"test_fraction": TEST_FRACTION, "seed": SPLIT_SEED, "size": IMG_SIZE}, sort_keys=True),
            "train": json.dumps(dataclasses.asdict(config), sort_keys=True)}


def task_checkpoint_path(config: TrainConfig = TrainConfig(), cache_dir: str | os.PathLike | None = None) -> Path:
    """<root>/checkpoints/<model>-digits-<recipe hash>-seed<seed>.safetensors."""
    digest = hashlib.sha256(json.dumps(_want(config), sort_keys=True).encode()).hexdigest()[:KEY_CHARS]
    return checkpoints_dir(cache_dir) / f"{TASK_MODEL}-{TASK}-{digest}-seed{config.seed}.safetensors"


def cached_task_checkpoint(config: TrainConfig = TrainConfig(), cache_dir: str | os.PathLike | None = None,
                           *, retrain: bool = False,
                           progress: Callable[[int, float], None] | None = None) -> Path:
    """The trained task checkpoint for `config`: trained and written (atomically) on first use.

    Its metadata records the recipe, the test top-1 (percent) and the training time.
    """
    path = task_checkpoint_path(config, cache_dir)
    want = _want(config)
    why = "is to be retrained" if retrain else checkpoint_problem(path, want)
    if why is None:
        return path
    log.info("task checkpoint %s %s: training %s on %s (%d epochs)", path, why, TASK_MODEL, TASK, config.epochs)
    split = digits_split()
    wall, cpu = time.monotonic(), time.process_time()
    model = train(config, split, progress)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    with torch_threads(config.threads):
        acc = top1(model, split.x_test, split.y_test)
    meta = {**want, "test_top1": f"{acc:.4f}", "test_samples": str(len(split.y_test)),
            "train_wall_s": f"{wall:.1f}", "train_cpu_s": f"{cpu:.1f}",
            "timm": timm.__version__, "torch": torch.__version__}
    return save_checkpoint(model.state_dict(), path, meta)


def task_info(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a task checkpoint (recipe, test top-1, training time), or TaskError."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error type and OSError
        raise TaskError(f"task checkpoint {str(path)!r}: not a readable safetensors file: {e}") from e
    if meta.get("task") != TASK or meta.get("model") != TASK_MODEL:
        raise TaskError(f"{str(path)!r}: expected a {TASK} checkpoint of {TASK_MODEL}, got task "
                        f"{meta.get('task')!r} of model {meta.get('model')!r}")
    return meta


def load_task_model(path: str | os.PathLike) -> torch.nn.Module:
    """The whole task model with the checkpoint's weights, in eval mode."""
    task_info(path)
    model = create_model(TASK_MODEL, **TASK_KWARGS)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edgezmq.model.task", description=__doc__.split("\n\n")[0])
    d = TrainConfig()
    ap.add_argument("--epochs", type=argtypes.int_in(1, MAX_EPOCHS), default=d.epochs)
    ap.add_argument("--seed", type=argtypes.seed, default=d.seed)
    ap.add_argument("--threads", type=argtypes.threads, default=d.threads,
                    help="torch threads while training (part of the cache key: other bits)")
    ap.add_argument("--cache-dir", help="cache root (default $EDGEZMQ_CACHE or ~/.cache/edgezmq)")
    ap.add_argument("--retrain", action="store_true", help="train even if the checkpoint is cached")
    ap.add_argument("--json", action="store_true", help="print the checkpoint's metadata as one JSON object")
    args = ap.parse_args(argv)
    try:
        config = TrainConfig(epochs=args.epochs, seed=args.seed, threads=args.threads)
    except ValueError as e:
        ap.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    def progress(epoch: int, loss: float) -> None:
        print(f"epoch {epoch + 1}/{config.epochs}  loss {loss:.3f}", file=sys.stderr, flush=True)

    try:
        path = cached_task_checkpoint(config, args.cache_dir, retrain=args.retrain, progress=progress)
        meta = task_info(path)
    except TaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps({"checkpoint": str(path), **meta}))
    else:
        print(f"{path}\n{TASK_MODEL} {meta['kwargs']} on {TASK}: test top-1 {float(meta['test_top1']):.2f}% "
              f"of {meta['test_samples']} images; trained in {meta['train_cpu_s']} CPU s "
              f"({meta['train_wall_s']} s wall, {config.threads} thread(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
