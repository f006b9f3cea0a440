"""The GPU path (device="mixed" decoding, GPU augmentation): runs only where CUDA is available.

On the CPU machines every test here is skipped; on a GPU machine it checks the same contract as the
CPU tests: placement, layout, dtype, padding labels, agreement with the CPU pipelines, and resume.
"""
import pytest
import torch

from pipeline.data import build_loader
from pipeline.data.generate import ensure_generated

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (DALI GPU pipelines)")

IMAGENET = {"dataset": "imagenet", "generated_classes": 4, "generated_size": 6, "generated_val_size": 3,
            "generated_image_px": 96, "image_size": 64}
DATASETS = {
    "cifar10": {"dataset": "cifar10", "generated_size": 8, "generated_val_size": 3},
    "imagenet": IMAGENET,
    "imagenet-cpu-decoding": {**IMAGENET, "decode_device": "cpu"},  # decoded on the CPU, the rest on the GPU
}


@pytest.fixture(scope="module", params=sorted(DATASETS))
def data_cfg(request, tmp_path_factory):
    cfg = {"root": str(tmp_path_factory.mktemp(request.param)), "generate": True, "batch_size": 8,
           "eval_batch_size": 8, "num_threads": 2, "device": "gpu", **DATASETS[request.param]}
    ensure_generated(cfg)
    return cfg


def test_gpu_batches_follow_the_contract(data_cfg):
    for split in ("train", "val"):
        loader = build_loader({**data_cfg, "dtype": "bfloat16"}, split, device_id=0)
        for images, labels in loader:
            assert images.device == labels.device == torch.device("cuda", 0)
            assert images.dtype == torch.bfloat16 and images.is_contiguous(memory_format=torch.channels_last)
            assert labels.dtype == torch.int64 and labels.shape == (8,)
        if split == "val":  # the last batch: real samples, then padding
            real = loader.num_samples - (len(loader) - 1) * 8
            assert (labels[:real] >= 0).all() and (labels[real:] == -1).all()


def test_gpu_val_agrees_with_cpu_val(data_cfg):
    gpu = torch.cat([x.cpu() for x, _ in build_loader(data_cfg, "val", device_id=0)])
    cpu = torch.cat([x for x, _ in build_loader({**data_cfg, "device": "cpu"}, "val")])
    if data_cfg["dataset"] == "cifar10":
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5)
    else:  # nvJPEG and libjpeg-turbo round differently; the pictures must still agree closely
        assert (gpu - cpu).abs().mean() < 0.05


def test_gpu_resume_is_exact(data_cfg):
    uninterrupted = build_loader(data_cfg, "train", device_id=0)
    expected = [(x.clone(), y.clone()) for _ in range(2) for x, y in uninterrupted][1:]  # two epochs, less one
    interrupted = build_loader(data_cfg, "train", device_id=0)
    next(iter(interrupted))
    resumed = build_loader(data_cfg, "train", device_id=0)
    resumed.load_state_dict(interrupted.state_dict())
    got = [(x, y) for x, y in resumed] + [(x, y) for x, y in resumed]
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_gpu_cifar_train_agrees_with_cpu_train(tmp_path):
    """The GPU-resident CIFAR source and GPU augmentation give the CPU pipeline's batches: the
    crops and flips come from the same seeded random operators."""
    cfg = {"dataset": "cifar10", "root": str(tmp_path), "generate": True, "generated_size": 8,
           "generated_val_size": 1, "batch_size": 8, "num_threads": 2}
    ensure_generated(cfg)
    gpu = build_loader({**cfg, "device": "gpu"}, "train", device_id=0, seed=3)
    cpu = build_loader({**cfg, "device": "cpu"}, "train", seed=3)
    for _ in range(2):  # two epochs: the second has its own permutation
        batches = list(zip(list(gpu), list(cpu)))
        assert len(batches) == len(cpu) > 0
        for (x, y), (cx, cy) in batches:
            torch.testing.assert_close(x.cpu(), cx, rtol=0, atol=1e-5)
            assert torch.equal(y.cpu(), cy)
