"""Tests for edgezmq.model.task: the digits split is fixed, training is seeded, the trained
checkpoint is cached once and the unit chain loads it as it is."""

from __future__ import annotations

import builtins
import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgezmq.model import chain, task

THREADS = 1
DIGITS = 1797
CLASS_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]  # of the UCI digits in scikit-learn
SUBSET = 128  # training images for the quick determinism test
PINNED_TEST_HEAD = [3, 7, 13, 16, 19, 22, 26, 36]  # the first test indices of the default split


def test_split_is_fixed_stratified_disjoint_and_complete():
    images, labels = task.load_digits()
    assert images.shape == (DIGITS, 8, 8) and images.dtype == np.float32
    assert images.min() == 0.0 and images.max() == 1.0
    assert np.bincount(labels).tolist() == CLASS_COUNTS
    tr, te = task.split_indices(labels)
    tr2, te2 = task.split_indices(labels)
    assert np.array_equal(tr, tr2) and np.array_equal(te, te2)
    assert not set(tr) & set(te) and sorted([*tr, *te]) == list(range(DIGITS))
    assert np.bincount(labels[te]).tolist() == [round(c * task.TEST_FRACTION) for c in CLASS_COUNTS]
    # pinned: numpy's legacy RandomState streams are frozen, so this split is the same everywhere
    assert len(te) == 450 and te[:8].tolist() == PINNED_TEST_HEAD
    other, _ = task.split_indices(labels, seed=1)
    assert not np.array_equal(other, tr)
    with pytest.raises(ValueError, match="test_fraction: expected a number in \\(0, 1\\), got 1.0"):
        task.split_indices(labels, 1.0)


def test_prepared_images_fit_the_task_model():
    split = task.digits_split()
    n = len(split.y_test)
    assert split.x_test.shape == (n, 3, task.IMG_SIZE, task.IMG_SIZE) and split.x_test.dtype == torch.float32
    assert len(split.y_train) + n == DIGITS
    assert -1.0 <= float(split.x_train.min()) and float(split.x_train.max()) <= 1.0
    assert torch.equal(split.x_test[:, 0], split.x_test[:, 2])  # grey: three equal channels
    assert chain.input_shape(task.TASK_MODEL, n, **task.TASK_KWARGS) == tuple(split.x_test.shape)


def test_missing_scikit_learn_is_a_one_line_error(monkeypatch):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(task.TaskError) as e:
        task.digits_split()
    msg = str(e.value)
    assert "\n" not in msg and "scikit-learn" in msg and "pip install" in msg
    assert e.value.exit_code == 1


def test_train_config_ranges():
    with pytest.raises(ValueError, match=r"TrainConfig.epochs: expected an integer in \[1, "):
        task.TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"TrainConfig.lr: expected a number in"):
        task.TrainConfig(lr=float("nan"))


def _subset(split: task.Split) -> task.Split:
    return dataclasses.replace(split, x_train=split.x_train[:SUBSET], y_train=split.y_train[:SUBSET])


def test_training_is_seeded_and_leaves_the_global_rng():
    split = _subset(task.digits_split())
    config = task.TrainConfig(epochs=1, threads=THREADS)
    state = torch.random.get_rng_state()
    losses: list[float] = []
    a = task.train(config, split, lambda epoch, loss: losses.append(loss))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = task.train(config, split)
    c = task.train(dataclasses.replace(config, seed=1), split)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert len(losses) == 1 and np.isfinite(losses[0]) and not a.training


@pytest.mark.slow
def test_checkpoint_is_trained_once_then_reused_and_the_chain_loads_it(tmp_path, monkeypatch):
    # what is claimed (cached once, reused, retrained alike when damaged) holds for any training
    # set: train on the quick test's subset (the whole test split is still scored)
    subset = _subset(task.digits_split())
    monkeypatch.setattr(task, "digits_split", lambda: subset)
    config = task.TrainConfig(epochs=1)
    path = task.cached_task_checkpoint(config, tmp_path)
    assert path == task.task_checkpoint_path(config, tmp_path) and path.parent == tmp_path / "checkpoints"
    meta = task.task_info(path)
    assert 0.0 <= float(meta["test_top1"]) <= 100.0 and meta["test_samples"] == "450"
    assert float(meta["train_cpu_s"]) > 0
    with monkeypatch.context() as m:
        m.setattr(task, "train", lambda *a, **k: pytest.fail("trained again"))
        assert task.cached_task_checkpoint(config, tmp_path) == path
    # another recipe is another file
    assert task.task_checkpoint_path(dataclasses.replace(config, epochs=2), tmp_path) != path
    # the unit chain takes the checkpoint as it is: two shards give the whole model's logits
    model = task.load_task_model(path)
    x = task.digits_split().x_test[:4]
    n = chain.num_units(task.TASK_MODEL, "block", **task.TASK_KWARGS)
    first = chain.build_shard(task.TASK_MODEL, 0, 2, checkpoint=path, **task.TASK_KWARGS)
    rest = chain.build_shard(task.TASK_MODEL, 2, n, checkpoint=path, **task.TASK_KWARGS)
    with torch.no_grad():
        assert torch.equal(rest(*first(x))[0], model(x))
    # a damaged file is trained anew, not used
    weights = {k: v.clone() for k, v in load_file(path).items()}  # copied: the file is cut next
    path.write_bytes(path.read_bytes()[:100])
    assert task.cached_task_checkpoint(config, tmp_path) == path
    assert task.task_info(path)["test_top1"] == meta["test_top1"]  # seeded: the same model again
    again = load_file(path)
    assert again.keys() == weights.keys() and all(torch.equal(again[k], weights[k]) for k in weights)
    with pytest.raises(task.TaskError, match="expected a digits checkpoint"):
        task.task_info(chain.write_checkpoint(task.TASK_MODEL, tmp_path / "seeded.safetensors", **task.TASK_KWARGS))
