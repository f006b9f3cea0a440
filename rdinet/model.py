"""The dynamic network: a ResNet whose every block has a relational router (RDI-Net)."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import arch_spec, build_backbone
from .executor import run_masked, run_selected
from .routers import EXECUTE, RelationalRouter

MODES = ("joint", "uniform", "full")
EXECUTORS = ("skip", "masked")


@dataclass
class RDIOutput:
    logits: torch.Tensor  # (B, num_classes)
    gates: torch.Tensor  # (B, N): relaxed v (joint training), 0/1 u otherwise


class RDINet(nn.Module):
    """Modes: "joint" (routers decide), "uniform" (USW, eq. 14: each block of each sample runs with
    probability 0.5), "full" (the static ResNet). In eval mode with hard decisions the "skip"
    executor runs each block only on the samples that execute it; "masked" runs it on all."""

    def __init__(self, arch: str, num_classes: int, gamma, r: int, d: int, tau: float,
                 straight_through: bool, executor: str):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.gamma, self.r, self.d = gamma, r, d
        self.tau = tau
        self.straight_through = straight_through
        self.executor = executor
        self._mode = "joint"
        # Execution probability of every block in "uniform" mode: 0.5 makes every path equally
        # likely (USW, eq. 14); other rates serve benchmarks of random paths at a given cost.
        self.uniform_rate = 0.5
        # Real skipping rounds each block's sample count up to a multiple of this (1: exact counts).
        self.skip_bucket = 1
        stem, blocks, channels = build_backbone(arch)
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.routers = nn.ModuleList(
            RelationalRouter(block.conv1.in_channels, d=d, r=r, gamma=gamma) for block in blocks
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> "RDINet":
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not known; accepted values: {MODES}")
        self._mode = mode
        return self

    @property
    def executor(self) -> str:
        return self._executor

    @executor.setter
    def executor(self, value: str) -> None:
        if value not in EXECUTORS:
            raise ValueError(f"executor={value!r} is not known; accepted values: {EXECUTORS}")
        self._executor = value

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
            raise ValueError(f"tau={value!r}: the Gumbel-softmax temperature must be a number > 0")
        self._tau = float(value)

    def block_parameters(self):
        """Every parameter except the routers' (stem, blocks, head)."""
        return (p for name, p in self.named_parameters() if not name.startswith("routers."))

    def router_parameters(self):
        return self.routers.parameters()

    def forward(self, images: torch.Tensor) -> RDIOutput:
        _check_images(images)
        x = self.stem(images)
        batch = x.shape[0]
        if self._mode == "uniform":
            sampled = torch.bernoulli(torch.full((batch, self.num_blocks), self.uniform_rate, device=x.device))
        skip = not self.training and self._executor == "skip"  # eval decisions are hard
        router_features: list[torch.Tensor] = []
        gates = []
        pooled = None  # GAP(x) when the previous block's blend computed it for this block's router
        for n, block in enumerate(self.blocks):
            if self._mode == "full":
                gate = torch.ones(batch, device=x.device)
                x = block(x)
            else:
                if self._mode == "joint":
                    s_n, logits = self.routers[n](x, router_features, pooled)
                    router_features = (router_features + [s_n])[-self.r:] if self.r else []
                    gate = self._decide(logits)
                else:
                    gate = sampled[:, n]
                if skip:
                    # Without autograd nothing else reads x_n (its router has run): overwrite it.
                    x = run_selected(block, x, gate, inplace=not torch.is_grad_enabled(), bucket=self.skip_bucket)
                elif self._mode == "joint" and n + 1 < self.num_blocks:
                    x, pooled = run_masked(block, x, gate, with_mean=True)
                else:
                    x = run_masked(block, x, gate)
            gates.append(gate)
        logits = self.fc(torch.flatten(self.avgpool(x), 1))
        return RDIOutput(logits=logits, gates=torch.stack(gates, dim=1))

    def _decide(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.training:
            return F.gumbel_softmax(logits, tau=self._tau, hard=self.straight_through)[:, EXECUTE]
        return (logits[:, EXECUTE] > logits[:, 1 - EXECUTE]).float()


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (B, 3, H, W); got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, 3, H, W) (rank 4); got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (B, 3, H, W); got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be a floating-point tensor (torch.float32, or bfloat16/float16 under a "
            f"cast model); got dtype {images.dtype}: convert and normalise them first"
        )


def create_model(arch: str, num_classes: int | None = None, gamma: float | str = 0.5, r: int = 2,
                 d: int = 256, tau: float = 1.0, straight_through: bool = False,
                 executor: str = "skip") -> RDINet:
    """An RDI-Net on `arch` (see ARCHS). num_classes defaults to 10 (CIFAR nets) or 1000 (ImageNet)."""
    spec = arch_spec(arch)
    if num_classes is None:
        num_classes = spec.default_classes
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")
    if gamma != "auto" and (isinstance(gamma, bool) or not isinstance(gamma, Real) or not 0 <= gamma <= 1):
        raise ValueError(f"gamma={gamma!r} must be a number in [0, 1] or \"auto\"")
    if not _is_int(r) or r < 0:
        raise ValueError(f"r={r!r} (preceding routers per relation graph) must be an integer >= 0")
    if not _is_int(d) or d <= 0:
        raise ValueError(f"d={d!r} (router feature size) must be an integer > 0")
    if gamma != "auto":
        gamma = float(gamma)
    return RDINet(arch, num_classes, gamma, r, d, tau, bool(straight_through), executor)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
