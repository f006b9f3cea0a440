"""Loader benchmark: DALI loader alone, training fed by it, and the same training on synthetic data.

    python -m benchmarks.loader_bench --dataset imagenet --device cuda        # ResNet-50, 224 px
    python -m benchmarks.loader_bench --dataset cifar10 --device cuda         # CIFAR ResNet-32
    python -m benchmarks.loader_bench --dataset cifar10 --device cuda --cuda-graph   # each step one CUDA graph
    python -m benchmarks.loader_bench --dataset imagenet --device cpu --batch-size 4 --steps 2 \
        --image-count 16 --image-size 64                             # seconds, for tests

Data: a generated dataset in the real layout (ImageNet-like JPEGs of about --image-px pixels,
or CIFAR pickles), written to --root (a temporary folder by default). Training: bf16 autocast
(fp32 on the CPU by default), channels_last, SGD, cross-entropy; with --cuda-graph the whole step
is captured once and replayed (pipeline.graphed_step, as train.cuda_graph trains). Each figure is images per second
over --steps steps after --warmup untimed ones; the two training figures are timed --rounds times,
interleaved, and the medians are reported (the fed fraction is the median of the rounds' ratios).
The last line is `RESULT {json}` for scripts.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import types

import torch

from benchmarks.timing import Timer
from benchmarks.workloads import cross_entropy, endless
from pipeline.config import nests_cuda_graphs
from pipeline.data import build_loader
from pipeline.data.generate import ensure_generated
from pipeline.step import TrainStep


def _model(dataset: str) -> torch.nn.Module:
    if dataset == "imagenet":
        import torchvision

        return torchvision.models.resnet50(num_classes=10)
    import rdinet

    model = rdinet.create_model("resnet32", num_classes=10)
    model.set_mode("full")  # the static ResNet: every block runs
    return model


class _Outputs(torch.nn.Module):
    """torchvision's ResNet returns its logits; the step reads .logits and .gates, as RDI-Net
    returns them."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images):
        return types.SimpleNamespace(logits=self.net(images), gates=None)


def _batches(loader, count: int):
    """`count` batches, running through as many epochs as needed."""
    return itertools.islice(endless(loader), count)


def _timed(run, steps: int, warmup: int, batch_size: int, device: torch.device) -> float:
    """img/s of run(n) (which does n steps) over `steps` steps, after `warmup` untimed ones; by the
    wall clock, since the loader's work runs on streams of its own."""
    run(warmup)
    window = Timer(device, warmup=0, iters=1, repeats=1, clock="wall")
    return steps * batch_size / window(lambda: run(steps))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loader_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=("imagenet", "cifar10"), default="imagenet")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved fed/synthetic timings; the figures are their medians "
                             "(default 5 on cuda, 1 on cpu)")
    parser.add_argument("--image-count", type=int, default=5120, help="generated training images")
    parser.add_argument("--image-px", type=int, default=448, help="generated JPEG side (ImageNet-like)")
    parser.add_argument("--image-size", type=int, default=224, help="ImageNet crop side")
    parser.add_argument("--num-threads", type=int, default=None,
                        help="DALI CPU threads (default: 2 for cifar10, whose pipeline needs few and whose "
                             "training competes with them for the CPU; up to 12 for imagenet's decoding)")
    parser.add_argument("--prefetch", type=int, default=3)
    parser.add_argument("--hw-decoder-load", type=float, default=1.0)
    parser.add_argument("--decode-device", choices=("mixed", "cpu"), default="mixed",
                        help="imagenet on cuda: decode JPEGs on the GPU (mixed) or on DALI's CPU threads "
                             "(data.decode_device)")
    parser.add_argument("--batches-per-run", type=int, default=0,
                        help="CIFAR: batches per DALI iteration (data.batches_per_run; 0: automatic)")
    parser.add_argument("--compile", choices=("none", "default", "reduce-overhead"), default="none",
                        help="torch.compile the network (reduce-overhead: CUDA graphs of the forward and "
                             "the backward); the loss and SGD step stay eager unless --cuda-graph")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture the whole step (forward, loss, backward, fused SGD) as one CUDA graph "
                             "and replay it, as train.cuda_graph does (GPU; --compile none or default)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast and bf16 batches (default on cuda) or fp32 (default on cpu, "
                             "where bf16 is emulated and slow)")
    parser.add_argument("--root", help="where the generated data is written (kept); default: a temp folder. "
                        "A real dataset already there is used as it is")
    args = parser.parse_args(argv)
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph captures CUDA graphs: it needs --device cuda")
    if nests_cuda_graphs(args.compile, args.cuda_graph):
        parser.error(f"--cuda-graph with --compile {args.compile}: its own CUDA graphs cannot be captured "
                     "inside the step's; use --compile default or none")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    if args.rounds is None:
        args.rounds = 5 if args.device == "cuda" else 1
    if args.num_threads is None:
        args.num_threads = 2 if args.dataset == "cifar10" else min(12, os.cpu_count() or 1)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    bf16 = (args.precision or ("bf16" if cuda else "fp32")) == "bf16"
    classes = 10
    data_cfg = {"dataset": args.dataset, "root": args.root or tempfile.mkdtemp(prefix="rdinet-bench-"),
                "generate": True, "generated_classes": classes, "generated_val_size": 1,
                "generated_size": math.ceil(args.image_count / classes), "generated_image_px": args.image_px,
                "batch_size": args.batch_size, "num_threads": args.num_threads, "prefetch": args.prefetch,
                "dtype": "bfloat16" if bf16 else "float32", "device": "gpu" if cuda else "cpu",
                "image_size": args.image_size, "hw_decoder_load": args.hw_decoder_load,
                "decode_device": args.decode_device,
                "batches_per_run": args.batches_per_run}
    ensure_generated(data_cfg)
    loader = build_loader(data_cfg, "train", device_id=(device.index or 0) if cuda else None)

    model = _model(args.dataset).to(device, memory_format=torch.channels_last)
    # The captured step replays the fused SGD (one kernel launch per tensor list, no host work).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=args.cuda_graph or None)

    forward = model if args.compile == "none" else torch.compile(model, mode=args.compile)
    net = forward if args.dataset == "cifar10" else _Outputs(forward)  # .logits, as rdinet's RDIOutput

    # Captured on the first batch with --cuda-graph: fed and synthetic share the one graph.
    step = TrainStep(net, optimizer, cross_entropy, bf16=bf16, compiled=args.compile == "reduce-overhead",
                     cuda_graph=args.cuda_graph)

    def train(batches):
        for images, labels in batches:
            step(images, labels)

    def consume(steps):
        for _ in _batches(loader, steps):
            pass

    side = args.image_size if args.dataset == "imagenet" else 32
    synthetic = (torch.randn(args.batch_size, 3, side, side, device=device, dtype=loader.dtype)
                 .contiguous(memory_format=torch.channels_last),
                 torch.randint(0, classes, (args.batch_size,), device=device))
    timing = dict(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, device=device)
    runs = {"fed": lambda n: train(_batches(loader, n)),
            "synthetic": lambda n: train(itertools.repeat(synthetic, n))}
    result = {"loader_img_s": _timed(consume, **timing), "rounds": []}
    for index in range(args.rounds):
        # Alternating the order cancels a drift of the machine's speed (clocks, other tenants).
        order = ("fed", "synthetic") if index % 2 == 0 else ("synthetic", "fed")
        speeds = {name: _timed(runs[name], **timing) for name in order}
        result["rounds"].append({"fed": speeds["fed"], "synthetic": speeds["synthetic"],
                                 "fraction": speeds["fed"] / speeds["synthetic"]})
    for key, name in (("train_loader_img_s", "fed"), ("train_synthetic_img_s", "synthetic"),
                      ("loader_fed_fraction", "fraction")):
        result[key] = statistics.median(r[name] for r in result["rounds"])
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{args.dataset} ({loader.num_samples} images in {data_cfg['root']}), batch {args.batch_size}, {name}, "
          f"DALI {'gpu' if cuda else 'cpu'} with {args.num_threads} threads, {'bf16' if bf16 else 'fp32'}, "
          f"compile {args.compile}" + (", the step as one CUDA graph" if args.cuda_graph else "")
          + (", JPEGs decoded on the CPU" if args.dataset == "imagenet" and cuda and args.decode_device == "cpu"
             else ""))
    print(f"loader only:              {result['loader_img_s']:10.1f} img/s")
    print(f"training, loader-fed:     {result['train_loader_img_s']:10.1f} img/s (median)")
    print(f"training, synthetic data: {result['train_synthetic_img_s']:10.1f} img/s (median)")
    print(f"loader-fed / synthetic:   {result['loader_fed_fraction']:10.3f}   (median of {args.rounds} "
          "interleaved rounds: " + ", ".join(f"{r['fraction']:.3f}" for r in result["rounds"]) + ")")
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
