"""The dynamic network: a ResNet whose every block has a relational router (RDI-Net)."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import arch_spec, build_backbone
from .executor import run_masked, run_selected
from .routers import EXECUTE, NORMS, RelationalRouter

MODES = ("joint", "uniform", "full")
EXECUTORS = ("skip", "masked")
EVAL_GATES = ("hard", "soft")


@dataclass
class RDIOutput:
    logits: torch.Tensor  # (B, num_classes)
    gates: torch.Tensor  # (B, N): relaxed v (joint training), 0/1 u otherwise
    # (B, N) execute-minus-skip router logits in "joint" mode in eval (None otherwise): how far
    # each decision is from a tie
    margins: torch.Tensor | None = None


class RDINet(nn.Module):
    """Modes: "joint" (routers decide), "uniform" (USW, eq. 14: each block of each sample runs with
    probability 0.5), "full" (the static ResNet). In eval mode with hard decisions the "skip"
    executor runs each block only on the samples that execute it; "masked" runs it on all.

    `eval_gates` is the rule of eval mode: "hard" (eq. 8's decision, u = 1 iff the execute logit
    is larger; deterministic and batch-independent) or "soft" (the noise-free relaxation
    softmax(logits / tau)[execute], blended; a diagnostic of what the soft-trained net computes)."""

    def __init__(self, arch: str, num_classes: int, gamma, r: int, d: int, tau: float,
                 straight_through: bool, executor: str, router_norm: str = "none"):
        super().__init__()
        self.arch = arch
        self.num_classes = num_classes
        self.gamma, self.r, self.d = gamma, r, d
        self.router_norm = router_norm
        self.tau = tau
        self.straight_through = straight_through
        self.executor = executor
        self.eval_gates = "hard"
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
            RelationalRouter(block.conv1.in_channels, d=d, r=r, gamma=gamma, norm=router_norm) for block in blocks
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
        self._mode = _accepted("mode", mode, MODES)
        return self

    @property
    def executor(self) -> str:
        return self._executor

    @executor.setter
    def executor(self, value: str) -> None:
        self._executor = _accepted("executor", value, EXECUTORS)

    @property
    def eval_gates(self) -> str:
        return self._eval_gates

    @eval_gates.setter
    def eval_gates(self, value: str) -> None:
        self._eval_gates = _accepted("eval_gates", value, EVAL_GATES)

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
        # eval decisions are hard (unless the soft diagnostic rule is on)
        skip = not self.training and self._executor == "skip" and self._eval_gates == "hard"
        router_features: list[torch.Tensor] = []
        gates, margins = [], []
        pooled = None  # GAP(x) when the previous block's blend computed it for this block's router
        for n, block in enumerate(self.blocks):
            if self._mode == "full":
                gate = torch.ones(batch, device=x.device)
                x = block(x)
            else:
                if self._mode == "joint":
                    s_n, logits = self.routers[n](x, router_features, pooled)
                    router_features = (router_features + [s_n])[-self.r:] if self.r else []
                    gate, margin = self._decide(logits)
                    if margin is not None:
                        margins.append(margin)
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
        return RDIOutput(logits=logits, gates=torch.stack(gates, dim=1),
                         margins=torch.stack(margins, dim=1) if margins else None)

    def _decide(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(gate, margin); the margin is an eval diagnostic, so the training step skips it."""
        logits = logits.float()
        if self.training:
            return F.gumbel_softmax(logits, tau=self._tau, hard=self.straight_through)[:, EXECUTE], None
        margin = logits[:, EXECUTE] - logits[:, 1 - EXECUTE]
        if self._eval_gates == "soft":
            return torch.softmax(logits / self._tau, dim=1)[:, EXECUTE], margin
        return (margin > 0).float(), margin


def _accepted(name: str, value: str, accepted: tuple[str, ...]) -> str:
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not known; accepted values: {accepted}")
    return value


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
                 executor: str = "skip", router_norm: str = "none") -> RDINet:
    """An RDI-Net on `arch` (see ARCHS). num_classes defaults to 10 (CIFAR nets) or 1000 (ImageNet).
    router_norm: "none" (the paper's router) or "batch" (a BatchNorm before each of its ReLUs)."""
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
    _accepted("router_norm", router_norm, NORMS)
    if gamma != "auto":
        gamma = float(gamma)
    return RDINet(arch, num_classes, gamma, r, d, tau, bool(straight_through), executor, router_norm)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
