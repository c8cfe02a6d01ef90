"""Client-side image I/O: timm preprocessing of image files, and top-5 labels of logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_images(directory: str | Path, model_name: str, **kwargs) -> tuple[np.ndarray, list[str]]:
    """Every JPEG/PNG in ``directory`` (sorted), preprocessed as timm does for ``model_name``
    at evaluation -> (N, C, H, W) float32 and the file names."""
    import timm.data
    from PIL import Image, UnidentifiedImageError

    from edgezmq.model import chain as models

    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"--images {directory}: not a directory")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"--images {directory}: no {'/'.join(IMAGE_SUFFIXES)} files")
    m = models.create_model(model_name, device="meta", **kwargs)
    cfg = timm.data.resolve_model_data_config(m)
    # the pretrained config names the hub weights' size; the model may be built for another
    cfg["input_size"] = tuple(models.input_shape(model_name, 1, **kwargs)[1:])
    transform = timm.data.create_transform(**cfg, is_training=False)
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append(transform(im.convert("RGB")).numpy())
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{f}: not a readable image ({e})") from None
    return np.stack(out).astype(np.float32), [f.name for f in files]


def top5(logits: np.ndarray, k: int = 5) -> list[list[tuple[str, float]]]:
    """Per sample, the k most likely classes with their softmax probability."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1)[:, :k]
    label = _labeller(logits.shape[1])
    return [[(label(int(i)), float(p[r, i])) for i in row] for r, row in enumerate(idx)]


def _labeller(num_classes: int):
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo

            info = ImageNetInfo()
            return lambda i: info.index_to_description(i).split(",")[0]
        except Exception:  # older timm without the label tables
            pass
    return lambda i: f"class {i}"
