"""ImageNet-style loaders on CPU: output contract, labels, exact eval pre-processing, train
augmentation (random resized crop + flip), file lists, sharding."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import build_loader
from pipeline.data.generate import class_colour, ensure_generated, wnid


@pytest.fixture(scope="module")
def generated_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inet"))
    ensure_generated({"dataset": "imagenet", "root": root, "generate": True, "generated_classes": 4,
                      "generated_size": 6, "generated_val_size": 3, "generated_image_px": 64})
    return root


def cfg(root, **kw):
    return {"dataset": "imagenet", "root": root, "batch_size": 4, "eval_batch_size": 5, "image_size": 32,
            "num_threads": 1, **kw}


def denormalise(images, loader):
    mean = torch.tensor(loader.mean).view(1, 3, 1, 1)
    std = torch.tensor(loader.std).view(1, 3, 1, 1)
    return (images.float() * std + mean).permute(0, 2, 3, 1).numpy()  # NHWC, 0..255


def write_images(root, split, images_by_class, ext="png"):
    for c, images in enumerate(images_by_class):
        os.makedirs(os.path.join(root, split, wnid(c)), exist_ok=True)
        for i, image in enumerate(images):
            Image.fromarray(image).save(os.path.join(root, split, wnid(c), f"{i}.{ext}"))


def jpegs_under(root, split):
    """Paths, relative to root, of the JPEGs under root/split, sorted."""
    paths = [os.path.join(folder, name) for folder, _, names in os.walk(os.path.join(root, split))
             for name in names if name.endswith(".JPEG")]
    return sorted(os.path.relpath(path, root) for path in paths)


def test_output_contract(generated_root):
    for split, batch, count in (("train", 4, 24), ("val", 5, 12)):
        loader = build_loader(cfg(generated_root), split)
        assert (loader.num_classes, loader.num_samples, len(loader)) == (4, count, 6 if split == "train" else 3)
        assert loader.mean == pytest.approx((123.675, 116.28, 103.53))
        for epoch in range(2):
            batches = list(loader)
            assert len(batches) == len(loader) and loader.epoch == epoch + 1
            for images, labels in batches:
                assert images.shape == (batch, 3, 32, 32) and images.dtype == torch.float32
                assert images.is_contiguous(memory_format=torch.channels_last)
                assert labels.shape == (batch,) and labels.dtype == torch.int64
    assert (labels[2:] == -1).all() and (labels[:2] >= 0).all()  # val: 12 = 5 + 5 + 2, then padding


def test_labels_match_generated_colours(generated_root):
    """Every crop shows class c's background class_colour(c) or its shape's colour (c + 128) % 256:
    most pixels are nearest one of those two."""
    colours = np.stack([class_colour(c, 4) for c in range(4)])
    palette = np.concatenate([colours, (colours + 128) % 256])
    for split in ("train", "val"):
        loader = build_loader(cfg(generated_root, dtype="bfloat16"), split)
        for images, labels in loader:
            assert images.dtype == torch.bfloat16
            pixels = denormalise(images, loader).reshape(len(images), -1, 1, 3)
            nearest = np.argmin(((pixels - palette) ** 2).sum(-1), axis=-1) % 4  # per pixel
            votes = np.stack([np.bincount(n, minlength=4) for n in nearest])
            real = labels >= 0
            assert (votes.argmax(1)[real] == labels[real].numpy()).all()


def test_eval_is_resize_256_centre_crop_224_exactly(tmp_path):
    """64 px images and image_size 56: the shorter side is resized to 56 * 256/224 = 64 (no change),
    so the output must be the centre 56 x 56 of the file, normalised, to float rounding."""
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)] for _ in range(2)]
    for split in ("train", "val"):
        write_images(str(tmp_path), split, images)
    loader = build_loader(cfg(str(tmp_path), eval_batch_size=6, image_size=56), "val")
    out, labels = next(iter(loader))
    source = np.stack([image for per_class in images for image in per_class])[:, 4:60, 4:60]
    mean, std = np.array(loader.mean, np.float32), np.array(loader.std, np.float32)
    reference = torch.from_numpy(((source - mean) / std).transpose(0, 3, 1, 2))
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)

    # a non-square image: the shorter side becomes 64, the longer one scales with it
    wide = build_loader(cfg(str(tmp_path), eval_batch_size=6, image_size=28), "val")
    assert next(iter(wide))[0].shape == (6, 3, 28, 28)


def test_train_random_resized_crop_and_flip(tmp_path):
    """Images whose red channel is the column and green the row show which part was cropped."""
    h, w = 96, 128
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx * 255 / (w - 1), yy * 255 / (h - 1), np.full((h, w), 128)], -1).round().astype(np.uint8)
    write_images(str(tmp_path), "train", [[image] * 8] * 3)
    loader = build_loader(cfg(str(tmp_path), image_size=48, batch_size=8), "train")
    flips = total = 0
    for _ in range(4):
        for images, _ in loader:
            for out in denormalise(images, loader):
                red, green = out[..., 0], out[..., 1]
                flipped = red[:, -1].mean() < red[:, 0].mean()
                width = abs(red[:, -1].mean() - red[:, 0].mean()) / 255 * (w - 1)
                height = (green[-1].mean() - green[0].mean()) / 255 * (h - 1)
                area, aspect = width * height / (w * h), width / height
                assert 0.06 <= area <= 1.01, area  # scale (0.08, 1), less the interpolation margin
                assert 0.7 <= aspect <= 1.4, aspect  # ratio (3/4, 4/3)
                flips += bool(flipped)
                total += 1
    assert total == 96 and 28 <= flips <= 68  # Binomial(96, 0.5): outside with probability < 1e-4


def test_file_lists(generated_root, tmp_path):
    train_files, val_files = jpegs_under(generated_root, "train"), jpegs_under(generated_root, "val")
    # label = position in the list: the labels then name the samples
    (tmp_path / "train.txt").write_text("".join(f"{f} {i}\n" for i, f in enumerate(train_files)))
    (tmp_path / "val.txt").write_text("".join(f"{f} {i}\n" for i, f in enumerate(val_files)))
    lists = cfg(generated_root, file_list=str(tmp_path / "train.txt"), val_file_list=str(tmp_path / "val.txt"))
    loader = build_loader(lists, "val")
    assert loader.num_classes == 24 and loader.num_samples == 12
    labels = torch.cat([y for _, y in loader])
    assert labels[:12].tolist() == list(range(12))


def test_sharding_two_ranks(generated_root, tmp_path):
    """23 train / 11 val samples over 2 ranks (uneven shards), with label = sample id (a file list)."""
    files = jpegs_under(generated_root, "train") + jpegs_under(generated_root, "val")
    (tmp_path / "train.txt").write_text("".join(f"{f} {i}\n" for i, f in enumerate(files[:23])))
    (tmp_path / "val.txt").write_text("".join(f"{f} {i}\n" for i, f in enumerate(files[23:34])))
    lists = cfg(generated_root, file_list=str(tmp_path / "train.txt"), val_file_list=str(tmp_path / "val.txt"),
                eval_batch_size=4)
    vals = [build_loader(lists, "val", shard_id=r, num_shards=2) for r in (0, 1)]
    assert len(vals[0]) == len(vals[1]) == 2
    seen = [int(v) for loader in vals for _, y in loader for v in y if v >= 0]
    assert sorted(seen) == list(range(11))

    trains = [build_loader(lists, "train", shard_id=r, num_shards=2) for r in (0, 1)]
    assert len(trains[0]) == len(trains[1]) == 2  # 11 and 12 samples: 2 full batches of 4 each
    epochs = []
    for _ in range(3):
        ids = [torch.cat([y for _, y in loader]).tolist() for loader in trains]
        assert len(ids[0]) == len(ids[1]) == 8 and not set(ids[0]) & set(ids[1])
        epochs.append(ids)
    assert epochs[0] != epochs[1] != epochs[2]  # a new shuffle each epoch
