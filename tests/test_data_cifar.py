"""CIFAR loaders on CPU: output contract, exact eval normalisation, augmentation, holdout, sharding.

Most tests use a hand-written CIFAR-10 layout whose pixels say where they come from: red = 8x + 1,
green = 8y + 1 (x, y the column and row) and blue = the sample's id, so every output pixel can be
traced back to its source sample and position.
"""
import os
import pickle

import numpy as np
import pytest
import torch

from pipeline.data import build_loader
from pipeline.data.cifar import read_batch_file
from pipeline.data.generate import class_colour, ensure_generated

N_TRAIN, N_TEST = 200, 50


def coded_images(ids):
    yy, xx = np.mgrid[0:32, 0:32]
    images = np.empty((len(ids), 32, 32, 3), np.uint8)
    images[..., 0], images[..., 1] = 8 * xx + 1, 8 * yy + 1
    images[..., 2] = np.asarray(ids)[:, None, None]
    return images


def write_cifar10(root, train_images, train_labels, test_images, test_labels):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)

    def dump(name, images, labels):
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1),
                         "labels": [int(v) for v in labels]}, f)

    for b, rows in enumerate(np.array_split(np.arange(len(train_images)), 5)):
        dump(f"data_batch_{b + 1}", train_images[rows], np.asarray(train_labels)[rows])
    dump("test_batch", test_images, test_labels)


@pytest.fixture(scope="module")
def coded_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coded"))
    write_cifar10(root, coded_images(range(N_TRAIN)), np.arange(N_TRAIN) % 10,
                  coded_images(range(N_TEST)), np.arange(N_TEST) % 10)
    return root


@pytest.fixture(scope="module")
def generated_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gen"))
    ensure_generated({"dataset": "cifar10", "root": root, "generate": True, "generated_size": 20,
                      "generated_val_size": 5})
    return root


def cfg(root, **kw):
    return {"dataset": "cifar10", "root": root, "batch_size": 20, "eval_batch_size": 16, "num_threads": 1, **kw}


def denormalise(images, loader):
    mean = torch.tensor(loader.mean).view(1, 3, 1, 1)
    std = torch.tensor(loader.std).view(1, 3, 1, 1)
    return (images.float() * std + mean).round().permute(0, 2, 3, 1).numpy()  # NHWC, 0..255


def reference_normalise(images_nhwc, loader):
    mean, std = np.array(loader.mean, np.float32), np.array(loader.std, np.float32)
    return torch.from_numpy(((images_nhwc.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2))


def test_output_contract(generated_root):
    for split, batch, count in (("train", 20, 200), ("val", 16, 50)):
        loader = build_loader(cfg(generated_root), split)
        assert (loader.num_classes, loader.num_samples) == (10, count)
        assert len(loader) == (count // batch if split == "train" else -(-count // batch))
        assert loader.mean == pytest.approx((125.307, 122.961, 113.8575))
        batches = list(loader)
        assert len(batches) == len(loader) and loader.epoch == 1
        for images, labels in batches:
            assert images.shape == (batch, 3, 32, 32) and images.dtype == torch.float32
            assert images.is_contiguous(memory_format=torch.channels_last)
            assert labels.shape == (batch,) and labels.dtype == torch.int64
            assert images.device.type == labels.device.type == "cpu"


def test_labels_match_generated_colours(generated_root):
    """Generated class c has background class_colour(c): the image's median colour finds it."""
    palette = np.stack([class_colour(c, 10) for c in range(10)])
    for split in ("train", "val"):
        loader = build_loader(cfg(generated_root), split)
        for images, labels in loader:
            pixels = denormalise(images, loader).reshape(len(images), -1, 3)
            # the crop's zero padding (up to 23 % of a training image) is no class's colour
            median = np.stack([np.median(p[(p != 0).any(-1)], axis=0) for p in pixels])
            nearest = np.argmin(((median[:, None] - palette[None]) ** 2).sum(-1), axis=1)
            real = labels >= 0
            assert (nearest[real] == labels[real].numpy()).all()


def test_eval_normalisation_exact_and_padding(generated_root):
    loader = build_loader(cfg(generated_root), "val")
    images, labels = map(torch.cat, zip(*loader))
    reference, ref_labels = read_batch_file(os.path.join(generated_root, "cifar-10-batches-py", "test_batch"),
                                            "cifar10")
    assert len(labels) == 64 and (labels[50:] == -1).all()
    assert torch.equal(labels[:50], torch.from_numpy(ref_labels))
    torch.testing.assert_close(images[:50], reference_normalise(reference, loader), rtol=0, atol=1e-5)
    torch.testing.assert_close(images[50:], images[49:50].expand(14, -1, -1, -1))  # padding repeats the last


def test_bfloat16_output(generated_root):
    fp32 = next(iter(build_loader(cfg(generated_root), "val")))[0]
    bf16 = next(iter(build_loader(cfg(generated_root, dtype="bfloat16"), "val")))[0]
    assert bf16.dtype == torch.bfloat16 and bf16.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(bf16, fp32.to(torch.bfloat16))


def test_train_augmentation_is_pad4_crop_and_flip(coded_root):
    loader = build_loader(cfg(coded_root), "train")
    images = torch.cat([x for x, _ in loader])
    pixels = denormalise(images, loader)  # N, 32, 32, 3
    seen, offsets, flips = [], [], 0
    for out, normalised in zip(pixels, images):
        sample = int(out[16, 16, 2])
        flipped = out[16, 20, 0] < out[16, 12, 0]
        unflipped = out[:, ::-1] if flipped else out
        ox, oy = int(unflipped[16, 16, 0] - 1) // 8 - 16, int(unflipped[16, 16, 1] - 1) // 8 - 16
        # the reference: the source padded by 4 zeros, the 32 x 32 window at (4 + oy, 4 + ox), flipped
        padded = np.zeros((40, 40, 3), np.uint8)
        padded[4:36, 4:36] = coded_images([sample])[0]
        window = padded[4 + oy:36 + oy, 4 + ox:36 + ox]
        window = window[:, ::-1] if flipped else window
        torch.testing.assert_close(normalised[None], reference_normalise(window[None].copy(), loader),
                                   rtol=0, atol=1e-5)
        seen.append(sample)
        offsets.append((oy, ox))
        flips += bool(flipped)
    assert sorted(seen) == list(range(N_TRAIN))  # one epoch: every sample once
    assert {o for pair in offsets for o in pair} == set(range(-4, 5))
    assert 70 <= flips <= 130  # Binomial(200, 0.5): outside this with probability < 1e-4


def test_holdout_takes_the_last_training_images(coded_root):
    train = build_loader(cfg(coded_root, holdout=30), "train")
    val = build_loader(cfg(coded_root, holdout=30, eval_batch_size=10), "val")
    assert (train.num_samples, val.num_samples, len(val)) == (170, 30, 3)
    val_ids = [int(v) for x, _ in val for v in denormalise(x, val)[:, 16, 16, 2]]
    assert val_ids == list(range(170, 200))
    train_ids = {int(v) for x, _ in train for v in denormalise(x, train)[:, 16, 16, 2]}
    assert train_ids <= set(range(170)) and len(train_ids) == 160  # 8 full batches of 20


def ids_of(loader):
    return [[int(v) for v in denormalise(x, loader)[:, 16, 16, 2]] for x, _ in loader]


def test_sharding_two_ranks(coded_root):
    vals = [build_loader(cfg(coded_root), "val", shard_id=r, num_shards=2) for r in (0, 1)]
    assert len(vals[0]) == len(vals[1]) == 2  # 25 samples each -> 2 batches of 16
    real = []
    for loader in vals:
        for images, labels in loader:
            ids = denormalise(images, loader)[:, 16, 16, 2]
            real += [int(i) for i, label in zip(ids, labels) if label >= 0]
    assert sorted(real) == list(range(N_TEST))  # every val sample exactly once over the ranks

    trains = [build_loader(cfg(coded_root, batch_size=16), "train", shard_id=r, num_shards=2) for r in (0, 1)]
    assert len(trains[0]) == len(trains[1]) == 6  # 100 samples per rank -> 6 full batches
    first = [sum(ids_of(t), []) for t in trains]
    second = [sum(ids_of(t), []) for t in trains]
    for epoch in (first, second):
        assert len(epoch[0]) == len(epoch[1]) == 96
        assert not set(epoch[0]) & set(epoch[1]) and len(set(epoch[0] + epoch[1])) == 192
    assert first[0] != second[0]  # a new shuffle each epoch


def test_same_seed_same_batches(coded_root):
    a = build_loader(cfg(coded_root), "train", seed=1)
    b = build_loader(cfg(coded_root), "train", seed=1)
    c = build_loader(cfg(coded_root), "train", seed=2)
    xa, xb, xc = (next(iter(loader))[0] for loader in (a, b, c))
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_cifar100_layout(tmp_path):
    ensure_generated({"dataset": "cifar100", "root": str(tmp_path), "generate": True, "generated_size": 2,
                      "generated_val_size": 1})
    loader = build_loader({"dataset": "cifar100", "root": str(tmp_path), "eval_batch_size": 25,
                           "num_threads": 1}, "val")
    labels = torch.cat([y for _, y in loader])
    assert loader.num_classes == 100 and loader.num_samples == 100
    assert sorted(labels.tolist()) == list(range(100))
    assert loader.mean == pytest.approx((129.3105, 124.0575, 112.4295))

