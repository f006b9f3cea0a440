"""The generated dataset: layouts, determinism, concurrency safety, refusal to mix or overwrite."""
import hashlib
import multiprocessing
import os
import pickle

import numpy as np
import pytest

from pipeline.data import DataError
from pipeline.data.cifar import load_split
from pipeline.data.generate import SHAPES, class_colour, draw_image, ensure_generated

SMALL = {"cifar10": {"generated_size": 6, "generated_val_size": 2},
         "cifar100": {"generated_size": 1, "generated_val_size": 1},
         "imagenet": {"generated_classes": 3, "generated_size": 4, "generated_val_size": 2,
                      "generated_image_px": 40}}


def gen_cfg(dataset, root, **kw):
    return {"dataset": dataset, "root": str(root), "generate": True, **SMALL[dataset], **kw}


def digest(root):
    """{relative path: sha256} of every file under root."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_cifar10_layout(tmp_path):
    ensure_generated(gen_cfg("cifar10", tmp_path))
    folder = tmp_path / "cifar-10-batches-py"
    assert sorted(os.listdir(folder)) == sorted(["GENERATED.json", "batches.meta", "test_batch"] +
                                                [f"data_batch_{i}" for i in range(1, 6)])
    with open(folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (12, 3072)
    images, labels = load_split("cifar10", str(tmp_path), "train")
    assert images.shape == (60, 32, 32, 3) and np.bincount(labels).tolist() == [6] * 10
    _, val_labels = load_split("cifar10", str(tmp_path), "val")
    assert np.bincount(val_labels).tolist() == [2] * 10


def test_cifar100_layout(tmp_path):
    ensure_generated(gen_cfg("cifar100", tmp_path))
    assert {"train", "test", "meta"} <= set(os.listdir(tmp_path / "cifar-100-python"))
    with open(tmp_path / "cifar-100-python" / "train", "rb") as f:
        content = pickle.load(f, encoding="latin1")
    assert sorted(content["fine_labels"]) == list(range(100)) and content["data"].shape == (100, 3072)


def test_imagenet_layout(tmp_path):
    ensure_generated(gen_cfg("imagenet", tmp_path))
    for split, count in (("train", 4), ("val", 2)):
        classes = sorted(d for d in os.listdir(tmp_path / split) if not d.endswith(".json"))
        assert classes == ["n00000000", "n00000001", "n00000002"]
        for wnid in classes:
            names = os.listdir(tmp_path / split / wnid)
            assert len(names) == count and all(n.endswith(".JPEG") for n in names)
            assert all(open(tmp_path / split / wnid / n, "rb").read(2) == b"\xff\xd8" for n in names)


@pytest.mark.parametrize("dataset", sorted(SMALL))
def test_deterministic(tmp_path, dataset):
    ensure_generated(gen_cfg(dataset, tmp_path / "a"))
    ensure_generated(gen_cfg(dataset, tmp_path / "b"))
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != {}


def test_classes_differ_in_colour_and_shape():
    palette = np.stack([class_colour(c, 100) for c in range(100)])
    distances = np.sqrt(((palette[:, None] - palette[None]) ** 2).sum(-1)) + np.eye(100) * 1e9
    assert distances.min() > 40  # far apart next to the +-10 jitter and the noise
    for c in range(10):
        image = draw_image("train", c, 3, 10, 32, 32).reshape(-1, 3).astype(float)
        median = np.median(image, axis=0)
        assert np.abs(median - class_colour(c, 10)).max() < 16
        foreground = np.abs(image - (class_colour(c, 10) + 128) % 256).max(1) < 30
        assert 0.02 < foreground.mean() < 0.5  # the shape is there, smaller than the background
    assert len(SHAPES) == 8


def test_second_call_keeps_the_data_and_other_parameters_are_refused(tmp_path):
    ensure_generated(gen_cfg("cifar10", tmp_path))
    before = {p: os.stat(tmp_path / "cifar-10-batches-py" / p).st_mtime_ns
              for p in os.listdir(tmp_path / "cifar-10-batches-py")}
    ensure_generated(gen_cfg("cifar10", tmp_path))
    after = {p: os.stat(tmp_path / "cifar-10-batches-py" / p).st_mtime_ns
             for p in os.listdir(tmp_path / "cifar-10-batches-py")}
    assert before == after
    with pytest.raises(DataError, match="delete it or choose another data.root"):
        ensure_generated(gen_cfg("cifar10", tmp_path, generated_size=7))


def test_generate_false_writes_nothing(tmp_path):
    ensure_generated({**gen_cfg("cifar10", tmp_path), "generate": False})
    assert os.listdir(tmp_path) == []


def test_a_real_dataset_is_left_alone_and_a_partial_one_refused(tmp_path):
    ensure_generated(gen_cfg("imagenet", tmp_path / "src"))
    real = tmp_path / "real"
    os.makedirs(real / "train" / "n1")
    os.makedirs(real / "val" / "n1")
    ensure_generated(gen_cfg("imagenet", real))
    assert sorted(os.listdir(real)) == ["train", "val"] and os.listdir(real / "train") == ["n1"]
    os.rmdir(real / "val" / "n1")
    os.rmdir(real / "val")
    with pytest.raises(DataError, match="it was not generated"):
        ensure_generated(gen_cfg("imagenet", real))


def _generate(cfg, barrier):
    barrier.wait()  # all processes start writing at once
    ensure_generated(cfg)


def test_concurrent_processes(tmp_path):
    ensure_generated(gen_cfg("imagenet", tmp_path / "alone"))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(3)
    workers = [context.Process(target=_generate, args=(gen_cfg("imagenet", tmp_path / "shared"), barrier))
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert sorted(os.listdir(tmp_path / "shared")) == ["train", "val"]  # no scratch folders left
    assert digest(tmp_path / "shared") == digest(tmp_path / "alone")
