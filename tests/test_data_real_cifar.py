"""Real CIFAR-10 training images (the project's shared JPEG archive, written in the official layout
by its own script): the loader reads them correctly and the normalisation constants fit them."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import DataError, build_loader
from pipeline.data.cifar import load_split

# building the 50,000 real images into batches takes ~8 s (only where the archive is)
pytestmark = pytest.mark.slow

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARCHIVE = SHARED_DATA / "cifar10-train-jpeg.tar.gz"


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {ARCHIVE} (only on the project's machines)")
    root = tmp_path_factory.mktemp("cifar10-real")
    subprocess.run([sys.executable, str(SHARED_DATA / "cifar_jpeg_to_batches.py"), str(ARCHIVE), str(root)],
                   check=True, capture_output=True, timeout=300)
    return str(root)


def cfg(root, **kw):
    return {"dataset": "cifar10", "root": root, "batch_size": 250, "eval_batch_size": 1000, "num_threads": 2,
            "holdout": 5000, **kw}


def test_normalisation_constants_fit_the_real_images(real_root):
    images, labels = load_split("cifar10", real_root, "train")
    assert images.shape == (50000, 32, 32, 3) and np.bincount(labels).tolist() == [5000] * 10
    loader = build_loader(cfg(real_root), "train")
    pixels = images[::5].reshape(-1, 3).astype(np.float32)  # 10,000 images are plenty for 0.02
    normalised = (pixels - np.array(loader.mean, np.float32)) / np.array(loader.std, np.float32)
    assert np.abs(normalised.mean(0)).max() < 0.02 and np.abs(normalised.std(0) - 1).max() < 0.02


def test_holdout_val_is_exact_and_train_augments(real_root):
    images, labels = load_split("cifar10", real_root, "train")
    val = build_loader(cfg(real_root), "val")
    assert (val.num_samples, len(val)) == (5000, 5)
    out, out_labels = map(torch.cat, zip(*val))
    mean, std = np.array(val.mean, np.float32), np.array(val.std, np.float32)
    reference = torch.from_numpy(((images[45000:] - mean) / std).transpose(0, 3, 1, 2))
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert torch.equal(out_labels, torch.from_numpy(labels[45000:]))

    train = build_loader(cfg(real_root), "train", shard_id=1, num_shards=2)
    assert (train.num_samples, len(train)) == (45000, 90)
    batch, batch_labels = next(iter(train))
    assert batch.shape == (250, 3, 32, 32) and 0 <= batch_labels.min() and batch_labels.max() <= 9
    assert abs(batch.mean().item()) < 0.3


def test_real_layout_without_test_batch_has_no_val_split(real_root):
    with pytest.raises(DataError, match="test_batch: missing"):
        build_loader(cfg(real_root, holdout=0), "val")
