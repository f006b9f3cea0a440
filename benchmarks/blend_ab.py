"""Training step img/s with the fused blend and router GAP (rdinet.kernels.blend, which also sums
the next router's GAP, and rdinet.routers.channel_mean for the first router's) against the same
step without them (torch ops, as before), and the static network; eager, bf16 autocast,
channels_last, synthetic data, one process.

    python -m benchmarks.blend_ab [--archs resnet50 resnet110] [--batch 256]
"""
import argparse
import contextlib

import torch

import rdinet.executor
import rdinet.routers
from benchmarks.timing import Timer
from benchmarks.workloads import ARCHS, MEAN, STD, make_training_model, synthetic, train_step_fn


@contextlib.contextmanager
def unfused():
    """The step as it ran before the kernels: torch ops for the blend and autograd's mean backward."""
    runs_on, mean = rdinet.executor.kernels.triton_runs_on, rdinet.routers.channel_mean
    rdinet.executor.kernels.triton_runs_on = lambda t: False
    rdinet.routers.channel_mean = lambda x: x.mean(dim=(2, 3))
    try:
        yield
    finally:
        rdinet.executor.kernels.triton_runs_on, rdinet.routers.channel_mean = runs_on, mean


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", nargs="+", default=["resnet50", "resnet110"], choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    device = torch.device("cuda")
    timer = Timer(device, warmup=5, iters=10, repeats=5)
    for arch in args.archs:
        size, classes = ARCHS[arch]
        data = synthetic(args.batch, size, classes, device)
        rates = {}
        for name in ("static", "joint unfused", "joint fused", "joint unfused again", "joint fused again"):
            mode = "full" if name == "static" else "joint"
            model = make_training_model(arch, classes, mode, device)
            step = train_step_fn(model, data, True, MEAN, STD, joint=mode == "joint")
            with unfused() if "unfused" in name else contextlib.nullcontext():
                rates[name] = args.batch / timer(step)
            del model, step
        cells = ", ".join(f"{k} {v:.0f}" for k, v in rates.items())
        print(f"{arch} train img/s: {cells}; fused/unfused {rates['joint fused'] / rates['joint unfused']:.2f}x, "
              f"fused/static {rates['joint fused'] / rates['static']:.2f}, unfused/static "
              f"{rates['joint unfused'] / rates['static']:.2f}")


if __name__ == "__main__":
    main()
