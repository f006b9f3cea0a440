"""Bad input to build_loader: each a DataError naming the file or key and what to do."""
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import DATA_DEFAULTS, DataError, build_loader
from pipeline.data.generate import ensure_generated


@pytest.fixture(scope="module")
def cifar_source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("c10"))
    ensure_generated({"dataset": "cifar10", "root": root, "generate": True, "generated_size": 4,
                      "generated_val_size": 2})
    return root


@pytest.fixture(scope="module")
def imagenet_source(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inet"))
    ensure_generated({"dataset": "imagenet", "root": root, "generate": True, "generated_classes": 3,
                      "generated_size": 4, "generated_val_size": 2, "generated_image_px": 48})
    return root


@pytest.fixture
def cifar_root(cifar_source, tmp_path):
    shutil.copytree(cifar_source, tmp_path / "c", dirs_exist_ok=True)
    return str(tmp_path / "c")


@pytest.fixture
def imagenet_root(imagenet_source, tmp_path):
    shutil.copytree(imagenet_source, tmp_path / "i", dirs_exist_ok=True)
    return str(tmp_path / "i")


def cifar(root, **kw):
    return {"dataset": "cifar10", "root": root, "batch_size": 4, "eval_batch_size": 4, "num_threads": 1, **kw}


def imagenet(root, **kw):
    return {**cifar(root), "dataset": "imagenet", "image_size": 24, **kw}


def batch_file(root, name="data_batch_3"):
    return os.path.join(root, "cifar-10-batches-py", name)


def rewrite(path, transform):
    with open(path, "rb") as f:
        content = pickle.load(f, encoding="latin1")
    with open(path, "wb") as f:
        pickle.dump(transform(content), f)


def test_defaults_hold_every_documented_key():
    for key in ("dataset", "root", "generate", "generated_size", "file_list", "batch_size", "eval_batch_size",
                "num_threads", "prefetch", "device", "dtype", "image_size", "holdout", "hw_decoder_load", "batches_per_run",
                "decode_device"):
        assert key in DATA_DEFAULTS
    assert DATA_DEFAULTS["root"] is None and DATA_DEFAULTS["holdout"] == 0


@pytest.mark.parametrize("bad, message", [
    ({"root": None}, "data.root is not set"),
    ({"dataset": "mnist"}, "data.dataset must be one of"),
    ({"batch_size": 0}, "data.batch_size must be a positive integer"),
    ({"dtype": "float16"}, "data.dtype must be float32 or bfloat16"),
    ({"colour": 1}, "unknown data config key"),
    ({"holdout": -1}, "data.holdout"),
    ({"batches_per_run": -1}, "data.batches_per_run must be an integer >= 0"),
    ({"dataset": "imagenet", "batches_per_run": 2}, "applies to CIFAR only"),
    ({"device": "gpu"}, "no device_id"),
    ({"generated_classes": 11}, "generated_classes must be 0"),
    ({"decode_device": "gpu"}, "data.decode_device must be mixed"),
])
def test_bad_config_values(cifar_source, bad, message):
    with pytest.raises(DataError, match=message):
        build_loader({**cifar(cifar_source), **bad}, "train")


def test_bad_call_arguments(cifar_source):
    with pytest.raises(DataError, match="split must be"):
        build_loader(cifar(cifar_source), "test")
    with pytest.raises(DataError, match="shard_id 2"):
        build_loader(cifar(cifar_source), "train", shard_id=2, num_shards=2)
    with pytest.raises(DataError, match="no full batch; lower data.batch_size"):
        build_loader(cifar(cifar_source, batch_size=64), "train")
    if not torch.cuda.is_available():
        with pytest.raises(DataError, match="CUDA is not available"):
            build_loader(cifar(cifar_source, device="gpu"), "train", device_id=0)


def test_cifar_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"cifar-10-batches-py: not found.*data.generate=true"):
        build_loader(cifar(str(tmp_path / "nowhere")), "train")


def test_cifar_missing_split_file(cifar_root):
    os.remove(batch_file(cifar_root, "test_batch"))
    build_loader(cifar(cifar_root), "train")
    with pytest.raises(DataError, match=r"test_batch: missing"):
        build_loader(cifar(cifar_root), "val")
    build_loader(cifar(cifar_root, holdout=8), "val")  # the holdout needs no test file


@pytest.mark.parametrize("damage, message", [
    (lambda path: open(path, "wb").write(b"not a pickle at all"), "not a readable pickle"),
    (lambda path: open(path, "wb").write(b""), "not a readable pickle"),
    (lambda path: rewrite(path, lambda c: [c]), "holds a list, not a CIFAR batch dict"),
    (lambda path: rewrite(path, lambda c: {"pixels": c["data"], "labels": c["labels"]}), "lack 'data'"),
    (lambda path: rewrite(path, lambda c: {**c, "data": c["data"][:, :1000]}), r"not \(N, 3072\) uint8"),
    (lambda path: rewrite(path, lambda c: {**c, "data": c["data"].astype(np.float32)}), "float32"),
    (lambda path: rewrite(path, lambda c: {**c, "labels": c["labels"][:-1]}), "integer labels"),
    (lambda path: rewrite(path, lambda c: {**c, "labels": [10] * len(c["labels"])}), r"outside 0..9"),
])
def test_cifar_files_that_are_not_cifar_batches(cifar_root, damage, message):
    damage(batch_file(cifar_root))
    with pytest.raises(DataError, match=message) as error:
        build_loader(cifar(cifar_root), "train")
    assert "data_batch_3" in str(error.value) and "official cifar10 python download" in str(error.value)


def test_cifar_holdout_too_large(cifar_source):
    with pytest.raises(DataError, match="leaves no training images"):
        build_loader(cifar(cifar_source, holdout=40), "train")


def test_imagenet_structure_problems(imagenet_root, tmp_path):
    with pytest.raises(DataError, match="data.root not found"):
        build_loader(imagenet(str(tmp_path / "nowhere")), "train")

    shutil.rmtree(os.path.join(imagenet_root, "val"))
    build_loader(imagenet(imagenet_root), "train")
    with pytest.raises(DataError, match=r"/val: split folder missing"):
        build_loader(imagenet(imagenet_root), "val")

    os.makedirs(os.path.join(imagenet_root, "val", "n99999999"))
    Image.new("RGB", (8, 8)).save(os.path.join(imagenet_root, "val", "n99999999", "x.JPEG"))
    with pytest.raises(DataError, match=r"n99999999: class 'n99999999' has no folder in train/"):
        build_loader(imagenet(imagenet_root), "val")

    os.makedirs(os.path.join(imagenet_root, "train", "n00000042"))
    with open(os.path.join(imagenet_root, "train", "n00000042", "notes.txt"), "w") as f:
        f.write("not an image")
    with pytest.raises(DataError, match=r"train/n00000042: class folder holds no images"):
        build_loader(imagenet(imagenet_root), "train")


def test_imagenet_bad_file_lists(imagenet_source, tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("train/n00000000/gen_0_0.JPEG 0\ntrain/n00000000/gen_0_1.JPEG zero\n")
    with pytest.raises(DataError, match=r"train.txt:2: expected 'path label'"):
        build_loader(imagenet(imagenet_source, file_list=str(listing)), "train")
    with pytest.raises(DataError, match="given as data.file_list not found"):
        build_loader(imagenet(imagenet_source, file_list=str(tmp_path / "none.txt")), "train")
    listing.write_text("train/n00000000/gen_0_0.JPEG 0\ntrain/n00000000/gen_0_1.JPEG 1\n")
    with pytest.raises(DataError, match="give data.val_file_list too"):
        build_loader(imagenet(imagenet_source, file_list=str(listing)), "val")
    (tmp_path / "val.txt").write_text("val/n00000000/gen_0_0.JPEG 5\n")
    with pytest.raises(DataError, match="labels up to 5, but the training classes are 0..1"):
        build_loader(imagenet(imagenet_source, file_list=str(listing), val_file_list=str(tmp_path / "val.txt")),
                     "val")


def first_train_image(root):
    folder = os.path.join(root, "train", "n00000001")
    return os.path.join(folder, sorted(os.listdir(folder))[0])


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "empty"])
def test_imagenet_undecodable_file_fails_with_a_pointer_to_the_check(imagenet_root, damage):
    path = first_train_image(imagenet_root)
    data = open(path, "rb").read()
    if damage == "corrupt":
        data = data[:200] + bytes(255 - b for b in data[200:])
    with open(path, "wb") as f:
        f.write({"corrupt": data, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(DataError, match=r"python -m pipeline.check_data") as error:
        for split in ("val", "train"):
            for _ in build_loader(imagenet(imagenet_root), split):
                pass
    if damage != "corrupt":  # DALI names the file for these
        assert os.path.basename(path) in str(error.value)


def test_imagenet_grayscale_cmyk_and_png_named_jpeg_are_decoded_to_rgb(imagenet_root):
    folder = os.path.join(imagenet_root, "val", "n00000000")
    names = sorted(os.listdir(folder))
    for name, mode, fmt in zip(names, ("L", "CMYK"), ("JPEG", "JPEG")):
        Image.open(os.path.join(folder, name)).convert(mode).save(os.path.join(folder, name), fmt)
    Image.open(os.path.join(folder, names[0])).convert("RGB").save(os.path.join(folder, "png.JPEG"), "PNG")
    loader = build_loader(imagenet(imagenet_root, eval_batch_size=7), "val")
    images, labels = next(iter(loader))
    assert loader.num_samples == 7 and images.shape == (7, 3, 24, 24) and torch.isfinite(images).all()
    gray = images[0].float() * torch.tensor(loader.std).view(3, 1, 1) + torch.tensor(loader.mean).view(3, 1, 1)
    torch.testing.assert_close(gray[0], gray[1], atol=1e-3, rtol=0)  # grayscale: R = G = B
