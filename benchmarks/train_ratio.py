"""Static ResNet-50 and RDI-Net-50 (joint, full loss) training img/s alternated in one process:
static, joint, joint, static (eager, bf16 autocast, channels_last, synthetic data, batch 256).
Run it from two checkouts, alternating processes, to compare commits on one warm machine:

    python -m benchmarks.train_ratio NAME     (prints NAME, the rdinet it imported, both rates, the ratio)
"""
import sys

import torch

import rdinet
from benchmarks.timing import Timer
from benchmarks.workloads import MEAN, STD, make_training_model, synthetic, train_step_fn


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
    device = torch.device("cuda")
    timer = Timer(device, warmup=5, iters=10, repeats=5)
    data = synthetic(256, 224, 1000, device)
    rates = {"full": [], "joint": []}
    for mode in ("full", "joint", "joint", "full"):  # symmetric order: a drift of the machine cancels
        model = make_training_model("resnet50", 1000, mode, device)
        rates[mode].append(256 / timer(train_step_fn(model, data, True, MEAN, STD, joint=mode == "joint")))
        del model
        torch.cuda.empty_cache()
    static, joint = (sum(rates[m]) / 2 for m in ("full", "joint"))
    print(f"{name} ({rdinet.__file__}): static {rates['full']} joint {rates['joint']} ratio {joint / static:.3f}")


if __name__ == "__main__":
    main()
