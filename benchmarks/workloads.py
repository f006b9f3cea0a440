"""What the benchmarks train and feed: the networks, synthetic batches, generated-data loaders and
the training step they time."""
from __future__ import annotations

import functools
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

import rdinet
from pipeline.step import TrainStep
from rdinet import srm
from rdinet.losses import total_loss

ARCHS = {"resnet50": (224, 1000), "resnet110": (32, 10)}
MEAN, STD = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)  # any plausible 0..255 statistics for the SRM


def make_model(arch: str, classes: int, mode: str, device, d: int = 256):
    model = rdinet.create_model(arch, num_classes=classes, d=d).to(device, memory_format=torch.channels_last)
    return model.set_mode(mode)


def make_training_model(arch: str, classes: int, mode: str, device):
    """make_model in train mode; the static network ("full") keeps its routers, which never run,
    out of the optimizer, as the trainer does."""
    model = make_model(arch, classes, mode, device).train()
    if mode == "full":
        for p in model.router_parameters():
            p.requires_grad_(False)
    return model


def cross_entropy(images, logits, gates, labels):
    """The static network's loss terms, in TrainStep's loss_terms signature."""
    return {"loss": F.cross_entropy(logits.float(), labels)}


def train_step_fn(model, batch_source, bf16: bool, mean, std, joint: bool, cuda_graph: bool = False):
    """One training step per call: SGD on the classification loss (static) or eq. 16 (joint).
    With cuda_graph the whole step is captured on the first batch and replayed (GraphedStep, as
    train.cuda_graph trains), with the fused SGD that a replay needs."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, fused=cuda_graph or None)

    def loss_terms(images, logits, gates, labels):
        if not joint:
            return cross_entropy(images, logits, gates, labels)
        hist = srm.color_histograms(images, bins=16, mean=mean, std=std)
        return total_loss(logits.float(), labels, gates.float(), hist, t=0.5, alpha=0.2)

    train_step = TrainStep(model, opt, loss_terms, bf16=bf16, cuda_graph=cuda_graph)
    return lambda: train_step(*batch_source())


def synthetic(batch: int, size: int, classes: int, device):
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device)
    return lambda: (images, labels)


def endless(loader):
    """The loader's batches without end: epoch after epoch."""
    return itertools.chain.from_iterable(iter(loader) for _ in itertools.count())


def from_loader(loader):
    """A batch source of endless batches from a DALI loader: the next batch per call."""
    return functools.partial(next, endless(loader))


def generated_loader(arch: str, batch: int, device, tmp: Path, tiny: bool, decode_device: str = "mixed"):
    from pipeline.data import build_loader
    from pipeline.data.generate import ensure_generated
    size, classes = ARCHS[arch]
    dataset = "imagenet" if size == 224 else "cifar10"
    # 2 * batch per class: 20 full batches an epoch of 10 classes, none dropped, so the timing sees
    # few epoch ends (a real ImageNet epoch has 5,005 batches)
    cfg = {"dataset": dataset, "root": str(tmp / dataset), "generate": True, "batch_size": batch,
           "generated_size": 4 if tiny else 2 * batch, "generated_classes": 10, "generated_val_size": 2,
           "num_threads": 2 if tiny else 12, "dtype": "bfloat16" if device.type == "cuda" else "float32",
           "device": "gpu" if device.type == "cuda" else "cpu", "image_size": 224 if not tiny else 64,
           "decode_device": decode_device}
    if dataset == "imagenet":
        cfg["generated_image_px"] = 64 if tiny else 400
    ensure_generated(cfg)
    loader = build_loader(cfg, "train", device_id=0 if device.type == "cuda" else None)
    return loader
