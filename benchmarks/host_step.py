"""Host time of a training step: ResNet-50 at batch 8 and 64 px, where the GPU's work is far shorter
than the host's launching, so the wall time per step is the host's. Rows (ms, the least of 3
rounds): static; joint with cross-entropy only; joint with the full loss (cost + SRM); and the
static and joint forward alone (autocast, autograd recording). Compare with the GPU time of a
step at batch 256 (`benchmarks/profile_step.py --arch resnet50`): a step whose host time exceeds
it is host-bound.

    python -m benchmarks.host_step NAME
"""
import sys
import time

import torch

from benchmarks.model_bench import MEAN, STD, make_training_model, synthetic, train_step_fn


def per_step_ms(fn, steps=40):
    for _ in range(8):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "this checkout"
    device = torch.device("cuda")
    data = synthetic(8, 64, 1000, device)
    rows = {}
    for _ in range(3):
        for row, mode, joint_loss in (("static", "full", False), ("joint CE", "joint", False), ("joint", "joint", True)):
            model = make_training_model("resnet50", 1000, mode, device)
            rows.setdefault(row, []).append(per_step_ms(train_step_fn(model, data, True, MEAN, STD, joint=joint_loss)))
            if row != "joint CE":
                def forward():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        model(data()[0])
                rows.setdefault(row + " fwd", []).append(per_step_ms(forward))
    print(name, " | ".join(f"{k} {min(v):.2f}" for k, v in rows.items()), "(ms, min of 3)")


if __name__ == "__main__":
    main()
