"""Where a training step's time goes: torch.profiler over a few steps of the static network and of
RDI-Net in joint mode (bf16 autocast, channels_last, synthetic data).

    python -m benchmarks.profile_step [--arch resnet110] [--batch 256] [--steps 5]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.workloads import ARCHS, make_training_model, synthetic, train_step_fn


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet110", choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--compile", action="store_true", help="profile the torch.compile'd step (mode default)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size, classes = ARCHS[args.arch]
    data = synthetic(args.batch, size, classes, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for mode in ("full", "joint"):
        model = make_training_model(args.arch, classes, mode, device)
        if args.compile:
            model.compile()
        step = train_step_fn(model, data, device.type == "cuda", (125.3, 123.0, 113.9), (63.0, 62.1, 66.7),
                             joint=mode == "joint")
        for _ in range(5):
            step()
        torch.cuda.synchronize() if device.type == "cuda" else None
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize() if device.type == "cuda" else None
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"=== {args.arch} {mode}: top ops by {key} over {args.steps} steps")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
