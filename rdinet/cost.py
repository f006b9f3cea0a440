"""Cost accounting: multiply-accumulates per image, derived from layer shapes.

Counted: convolutions and fully-connected layers (incl. the routers' FCs and GCN matmuls), as
torch.utils.flop_counter counts them; GFLOPs = 2 x GMACs (the paper's convention). A skipped block
costs its shortcut projection if it has one, else nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

_CACHE: dict[tuple, "CostTable"] = {}


@dataclass(frozen=True)
class CostTable:
    """MACs per image of each part of a model at one input size."""

    stem: int
    head: int
    full: tuple[int, ...]  # block n executed
    skip: tuple[int, ...]  # block n skipped (its shortcut projection, or 0)
    router: tuple[int, ...]  # router n

    @property
    def static(self) -> int:
        """The static backbone: every block runs, no routers."""
        return self.stem + self.head + sum(self.full)


def cost_table(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> CostTable:
    """Per-part MACs of `model` for images of `input_size` (C, H, W); cached per configuration."""
    model = _unwrap(model)
    input_size = _check_input_size(input_size)
    key = (model.arch, model.num_classes, model.d, model.r, model.gamma, input_size)
    if key not in _CACHE:
        _CACHE[key] = _build_table(model, input_size)
    return _CACHE[key]


def model_cost(model: nn.Module, gates: torch.Tensor, input_size: tuple[int, int, int] = (3, 32, 32),
               count_routers: bool | None = None) -> dict:
    """Mean cost per image of a batch whose hard decisions are `gates` (B, N) of 0/1.

    Returns gmacs, gflops (= 2 x gmacs), ratio (to the static backbone), static_gmacs and
    block_rates (fraction of images executing each block). Routers count when the model is in
    "joint" mode (override with count_routers).
    """
    model = _unwrap(model)
    table = cost_table(model, input_size)
    if not isinstance(gates, torch.Tensor) or gates.dim() != 2 or gates.shape[1] != len(table.full):
        shape = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates must be a (B, {len(table.full)}) tensor (one column per block); got {shape}")
    gates = gates.detach().to("cpu", torch.float64)
    if not bool(((gates == 0) | (gates == 1)).all()):
        raise ValueError("gates must be hard 0/1 decisions (the model's output in eval mode); got relaxed values")
    if count_routers is None:
        count_routers = model.mode == "joint"
    rates = gates.mean(dim=0)
    full = torch.tensor(table.full, dtype=torch.float64)
    skip = torch.tensor(table.skip, dtype=torch.float64)
    macs = table.stem + table.head + float((rates * full + (1 - rates) * skip).sum())
    if count_routers:
        macs += sum(table.router)
    return {
        "gmacs": macs / 1e9,
        "gflops": 2 * macs / 1e9,
        "ratio": macs / table.static,
        "static_gmacs": table.static / 1e9,
        "block_rates": rates.tolist(),
    }


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and DeepSpeed engines hold the network in `.module`.
    while not hasattr(model, "routers") and hasattr(model, "module"):
        model = model.module
    if not hasattr(model, "routers"):
        raise ValueError(f"model must be an RDI-Net from rdinet.create_model; got {type(model).__name__}")
    return model


def _check_input_size(input_size) -> tuple[int, int, int]:
    size = tuple(input_size)
    if len(size) != 3 or size[0] != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"input_size must be (3, H, W) with positive integers; got {input_size!r}")
    return size


def _build_table(model: nn.Module, input_size: tuple[int, int, int]) -> CostTable:
    h, w = input_size[1:]
    stem, h, w = _sequence_macs(model.stem.children(), h, w)
    full, skip, router = [], [], []
    for n, (block, r) in enumerate(zip(model.blocks, model.routers)):
        router.append(_router_macs(r, available=n))
        executed, shortcut, h, w = _block_macs(block, h, w)
        full.append(executed)
        skip.append(shortcut)
    head = _linear_macs(model.fc)
    return CostTable(stem, head, tuple(full), tuple(skip), tuple(router))


def _block_macs(block: nn.Module, h: int, w: int) -> tuple[int, int, int, int]:
    """(MACs executed, MACs skipped, output H, output W). The residual convs form a chain from
    the block input; the shortcut projection (`downsample`) also reads the block input."""
    residual, h_out, w_out = _sequence_macs(
        (m for name, m in block.named_modules() if not name.startswith("downsample")), h, w
    )
    shortcut = 0
    if getattr(block, "downsample", None) is not None:
        shortcut, _, _ = _sequence_macs(block.downsample.modules(), h, w)
    return residual + shortcut, shortcut, h_out, w_out


def _sequence_macs(modules, h: int, w: int) -> tuple[int, int, int]:
    """MACs of the convolutions among `modules` applied one after another, and the output size."""
    macs = 0
    for m in modules:
        if isinstance(m, nn.Conv2d):
            h_out, w_out = _out_size(m, h, w)
            k_h, k_w = m.kernel_size
            macs += h_out * w_out * m.out_channels * (m.in_channels // m.groups) * k_h * k_w
            h, w = h_out, w_out
        elif isinstance(m, nn.MaxPool2d):
            h, w = _out_size(m, h, w)
    return macs, h, w


def _out_size(m: nn.Module, h: int, w: int) -> tuple[int, int]:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    if isinstance(m.padding, str) or getattr(m, "ceil_mode", False):
        raise ValueError(f"cost accounting does not handle {m} (string padding or ceil_mode)")
    kernel, stride, padding, dilation = (pair(v) for v in (m.kernel_size, m.stride, m.padding, m.dilation))
    sizes = []
    for size, k, s, p, d in zip((h, w), kernel, stride, padding, dilation):
        sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return sizes[0], sizes[1]


def _linear_macs(layer: nn.Linear) -> int:
    return layer.in_features * layer.out_features


def _router_macs(router: nn.Module, available: int) -> int:
    """FC align (C_n x d), GCN weight (d x d), decision FC (d x 2), and for gamma = "auto" the
    cosine weights and the weighted sum as batched matmuls ((rows - 1) x d + rows x d). With a
    fixed gamma the weighted sum is (rows - 1) element-wise multiply-adds of d values, not counted,
    like BatchNorm and the residual adds (the convention of torch.utils.flop_counter)."""
    d = router.gcn.in_features
    rows = router.num_rows(available)
    aggregation = 0
    if rows > 1 and router.gamma == "auto":
        aggregation = (rows - 1) * d + rows * d
    return _linear_macs(router.align) + aggregation + _linear_macs(router.gcn) + _linear_macs(router.decide)
