"""Learning-rate schedule as a per-step factor.

DeepSpeed steps a scheduler handed to it on every optimizer step, so the schedule is written per
step: linear warm-up over `warmup_epochs`, then x`decay` at each milestone epoch.
"""
from __future__ import annotations

import bisect

import torch


def lr_factor(step: int, steps_per_epoch: int, milestones: list[int], decay: float,
              warmup_epochs: float) -> float:
    epoch = step / steps_per_epoch
    factor = decay ** bisect.bisect_right(sorted(milestones), epoch)
    if warmup_epochs > 0 and epoch < warmup_epochs:
        factor *= (step + 1) / (warmup_epochs * steps_per_epoch)
    return factor


def make_scheduler(optimizer, steps_per_epoch: int, milestones: list[int], decay: float,
                   warmup_epochs: float):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps_per_epoch, milestones, decay, warmup_epochs))


def scaled_lr(optim_cfg: dict, global_batch: int) -> float:
    """Linear scaling rule: lr is given for `reference_batch` images per step."""
    ref = optim_cfg["reference_batch"]
    return optim_cfg["lr"] * global_batch / ref if ref > 0 else optim_cfg["lr"]
