"""Where the CIFAR loader's cost lands when it feeds CUDA-graphed ResNet-32 training (the CIFAR
jobs' setting): loader variants and synthetic data alternated in one process (one compile), each
timed 4 times over 250 steps; per variant the loader alone (img/s), the fed img/s, the median fed
against the median synthetic, and the host's time inside next(loader) per batch, which is time
the thread that launches the steps spends waiting on DALI.

    python -m benchmarks.loader_host [--root DIR]
"""
import argparse
import itertools
import os
import statistics
import tempfile
import time

import torch

import rdinet
from benchmarks.timing import Timer
from benchmarks.workloads import cross_entropy
from pipeline.data import build_loader
from pipeline.data.generate import ensure_generated
from pipeline.step import TrainStep

VARIANTS = {  # data.* settings; DALI_AFFINITY_MASK pins DALI's threads to those CPUs
    "threads 2 (default)": {"num_threads": 2},
    "threads 6": {"num_threads": 6},
    "threads 2, prefetch 6": {"num_threads": 2, "prefetch": 6},
    "threads 2, DALI on CPUs 8-11": {"num_threads": 2, "DALI_AFFINITY_MASK": "8,9,10,11"},
    "8 batches per run, threads 4": {"num_threads": 4, "batches_per_run": 8},
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", help="where the generated CIFAR split is written (default: a temporary folder)")
    args = parser.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="rdinet-loader-host-")
    device = torch.device("cuda", 0)
    loader_alone = Timer(device, warmup=30, iters=300, repeats=1, clock="wall")  # DALI works on streams of its own
    fed_window = Timer(device, warmup=0, iters=250, repeats=1, clock="wall")
    feeds, alone = {}, {}
    for name, settings in VARIANTS.items():
        settings = dict(settings)
        mask = settings.pop("DALI_AFFINITY_MASK", None)
        if mask:
            os.environ["DALI_AFFINITY_MASK"] = mask
        else:
            os.environ.pop("DALI_AFFINITY_MASK", None)
        cfg = {"dataset": "cifar10", "root": root, "generate": True, "generated_classes": 10,
               "generated_size": 5000, "generated_val_size": 1, "batch_size": 256, "device": "gpu",
               "dtype": "bfloat16", **settings}
        ensure_generated(cfg)
        feed = itertools.chain.from_iterable(iter(build_loader(cfg, "train", device_id=0)) for _ in itertools.count())
        alone[name] = 256 / loader_alone(lambda: next(feed))
        feeds[name] = feed

    model = rdinet.create_model("resnet32", num_classes=10).set_mode("full").to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model, mode="reduce-overhead")

    # TrainStep takes the loss outside autocast, on float logits: as autocast runs cross_entropy.
    step = TrainStep(forward, optimizer, cross_entropy, bf16=True, compiled=True)

    images = torch.randn(256, 3, 32, 32, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    feeds["synthetic"] = itertools.repeat((images, torch.randint(0, 10, (256,), device=device)))
    for feed in feeds.values():
        for _ in range(20):
            step(*next(feed))
    results = {}
    for repeat in range(4):
        for name, feed in (feeds.items() if repeat % 2 == 0 else reversed(feeds.items())):
            waited = [0.0]  # seconds the host spent in next(feed)

            def fed_step():
                tick = time.perf_counter()
                batch = next(feed)
                waited[0] += time.perf_counter() - tick
                step(*batch)
            seconds = fed_window(fed_step)
            results.setdefault(name, []).append((256 / seconds, waited[0] / fed_window.iters * 1e3))
    synthetic = statistics.median(r[0] for r in results["synthetic"])
    for name, rows in results.items():
        print(f"{name:30s} alone {alone.get(name, 0):8.0f} | fed img/s " + " ".join(f"{r[0]:7.0f}" for r in rows)
              + f" | median / synthetic median {statistics.median(r[0] for r in rows) / synthetic:.3f}"
              + " | host in next() ms " + " ".join(f"{r[1]:.2f}" for r in rows))


if __name__ == "__main__":
    main()
