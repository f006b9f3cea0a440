"""Host time of a training step: ResNet-50 at batch 8 and 64 px, where the GPU's work is far shorter
than the host's launching, so the wall time per step is the host's. Rows (ms, the least of 3
rounds): static; joint with cross-entropy only; joint with the full loss (cost + SRM); and the
static and joint forward alone (autocast, autograd recording). Compare with the GPU time of a
step at batch 256 (`benchmarks/profile_step.py --arch resnet50`): a step whose host time exceeds
it is host-bound.

    python -m benchmarks.host_step NAME
"""
import sys

import torch

from benchmarks.timing import Timer
from benchmarks.workloads import MEAN, STD, make_training_model, synthetic, train_step_fn


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
    device = torch.device("cuda")
    # the wall clock: at this size the host's launching, not the GPU, sets the pace
    timer = Timer(device, warmup=8, iters=40, repeats=1, clock="wall")
    data = synthetic(8, 64, 1000, device)
    rows = {}
    for _ in range(3):
        for row, mode, joint_loss in (("static", "full", False), ("joint CE", "joint", False), ("joint", "joint", True)):
            model = make_training_model("resnet50", 1000, mode, device)
            step = train_step_fn(model, data, True, MEAN, STD, joint=joint_loss)
            rows.setdefault(row, []).append(1e3 * timer(step))
            if row != "joint CE":
                def forward():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        model(data()[0])
                rows.setdefault(row + " fwd", []).append(1e3 * timer(forward))
    print(name, " | ".join(f"{k} {min(v):.2f}" for k, v in rows.items()), "(ms, min of 3)")


if __name__ == "__main__":
    main()
