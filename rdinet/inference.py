"""Fast inference: an RDI-Net frozen for serving, whose skipped blocks cost no time.

    fast = rdinet.inference.freeze(model)      # model trained, any mode; eval statistics used
    out = fast(images)                         # RDIOutput: logits, hard gates (B, N)

`freeze` folds every BatchNorm into its convolution, casts the weights to bf16 on a GPU (float32
on the CPU) and keeps activations channels_last. A bottleneck block then runs as: its first 1x1
convolution reads only the executing samples' rows of x (`kernels.gather_linear`), the 3x3
convolution runs on that compact batch (cuDNN), and the last 1x1 convolution adds its result to
the shortcut and writes it into the executing samples' rows in place (`kernels.linear_scatter_`).
Samples that skip the block are neither read nor written, and no gathered copy of x is made.
(BasicBlocks, the CIFAR nets, gather and scatter with torch ops.)

The frozen net follows the model's mode: "joint" (the routers decide, one host sync per block to
size the executing batch), "uniform" (each block of each sample runs with probability
`model.uniform_rate`) and "full" (the static network: every block, dense, no routers). Decisions
may also be given (`gates=`). The result equals the model's eval forward up to the rounding of
folded BatchNorm and bf16.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .backbones import BasicBlock, Bottleneck
from .kernels import gather_linear, linear_scatter_
from .model import RDINet, RDIOutput
from .routers import EXECUTE

CHANNELS_LAST = torch.channels_last


def freeze(model: RDINet, dtype: torch.dtype | None = None, bucket: int = 32,
           use_triton: bool | None = None) -> "FrozenRDINet":
    """The inference form of `model` (on its device). dtype: bf16 on a GPU, float32 on the CPU.
    bucket: the 3x3 convolutions run on the executing samples padded to a multiple of this
    (cuDNN picks poor kernels for odd batch sizes; docs/performance.md compares buckets).
    use_triton: the 1x1 convolutions as Triton kernels (default: on CUDA) or as torch ops (see
    rdinet.kernels)."""
    if not isinstance(model, RDINet):
        raise ValueError(f"freeze needs an RDINet (rdinet.create_model); got {type(model).__name__}")
    device = next(model.parameters()).device
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return FrozenRDINet(model, dtype, bucket, use_triton)


class FrozenRDINet:
    def __init__(self, model: RDINet, dtype: torch.dtype, bucket: int, use_triton: bool | None):
        if isinstance(bucket, bool) or not isinstance(bucket, int) or bucket < 1:
            raise ValueError(f"bucket={bucket!r} must be an integer >= 1")
        self.model, self.dtype, self.bucket, self.use_triton = model, dtype, bucket, use_triton
        self.num_blocks = model.num_blocks
        stem = model.stem
        self.stem = FoldedConv(stem.conv1, stem.bn1, dtype)
        self.maxpool = getattr(stem, "maxpool", None)
        self.blocks = [_freeze_block(block, dtype) for block in model.blocks]
        self.routers = copy.deepcopy(model.routers).to(dtype).eval()
        self.fc_weight = model.fc.weight.detach().to(dtype)
        self.fc_bias = model.fc.bias.detach().to(dtype)

    @property
    def mode(self) -> str:
        return self.model.mode

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, gates: torch.Tensor | None = None) -> RDIOutput:
        x = self.stem.relu(images.to(self.dtype).contiguous(memory_format=CHANNELS_LAST))
        if self.maxpool is not None:
            x = self.maxpool(x)
        batch = x.shape[0]
        if gates is None and self.mode == "uniform":
            gates = torch.bernoulli(torch.full((batch, self.num_blocks), self.model.uniform_rate, device=x.device))
        if gates is not None:
            gates = _check_gates(gates, batch, self.num_blocks).to(x.device)
            indices = _executing_samples(gates)  # one host sync for every block
        routed = gates is None and self.mode == "joint"
        decided, margins, previous = [], [], []
        for n, block in enumerate(self.blocks):
            if routed:
                s_n, logits = self.routers[n](x, previous)
                previous = (previous + [s_n])[-self.model.r:] if self.model.r else []
                margin = logits[:, EXECUTE].float() - logits[:, 1 - EXECUTE].float()
                gate = margin > 0
                decided.append(gate)
                margins.append(margin)
                index = gate.nonzero().squeeze(1)  # the host waits here: it sizes the block's batch
            elif gates is None:  # "full": the static network
                index = None
            else:
                index = indices[n]
            x = block(x, None if index is not None and index.numel() == batch else index, self.bucket, self.use_triton)
        logits = F.linear(x.mean(dim=(2, 3)), self.fc_weight, self.fc_bias).float()
        if routed:
            gates = torch.stack(decided, dim=1)
        elif gates is None:
            gates = torch.ones(batch, self.num_blocks, device=x.device)
        return RDIOutput(logits=logits, gates=gates.float(), margins=torch.stack(margins, dim=1) if routed else None)


def _check_gates(gates, batch: int, blocks: int) -> torch.Tensor:
    if not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (batch, blocks):
        shape = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates must be a ({batch}, {blocks}) tensor of 0/1 decisions; got {shape}")
    return gates


def _executing_samples(gates: torch.Tensor) -> list[torch.Tensor]:
    """For each block, the samples (in batch order) whose gate is 1, with one host sync in all."""
    executes = (gates.t() > 0.5).contiguous()  # (N, B)
    counts = executes.sum(dim=1).tolist()
    order = torch.argsort((~executes).to(torch.int8), dim=1, stable=True)  # executing samples first
    return [order[n, :count] for n, count in enumerate(counts)]


class FoldedConv:
    """A convolution with its BatchNorm folded in (eval statistics), in `dtype`, channels_last."""

    def __init__(self, conv, bn, dtype):
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        self.weight = weight.detach().to(dtype).contiguous(memory_format=CHANNELS_LAST)
        self.bias = bias.detach().to(dtype)
        self.stride, self.padding = conv.stride, conv.padding
        self.fused_relu = True  # until cuDNN refuses the shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding).contiguous(memory_format=CHANNELS_LAST)

    def relu(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(conv(x) + bias): on a GPU cuDNN's fused convolution, faster than the convolution
        and a ReLU pass of its own (docs/performance.md, "Inference")."""
        if x.is_cuda and self.fused_relu:
            try:
                out = torch.cudnn_convolution_relu(x, self.weight, self.bias, self.stride, self.padding, (1, 1), 1)
                return out.contiguous(memory_format=CHANNELS_LAST)
            except RuntimeError:  # no fused engine for this shape or dtype: the plain path from now on
                self.fused_relu = False
        return self(x).relu_()

    def as_matrix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A 1x1 stride-1 convolution as (W^T (C_in, C_out), bias) for the row kernels."""
        assert self.weight.shape[2:] == (1, 1) and self.stride == (1, 1)
        return self.weight.flatten(1).t().contiguous(), self.bias.contiguous()


def _freeze_block(block, dtype):
    if isinstance(block, Bottleneck):
        return FrozenBottleneck(block, dtype)
    if isinstance(block, BasicBlock):
        return FrozenBasicBlock(block, dtype)
    raise ValueError(f"no frozen form for block type {type(block).__name__}")


def rows(x: torch.Tensor) -> torch.Tensor:
    """A channels_last (B, C, H, W) tensor as its (B*H*W, C) matrix of pixel rows (a view)."""
    return x.permute(0, 2, 3, 1).view(-1, x.shape[1])


def _padded(index: torch.Tensor, bucket: int, batch: int) -> torch.Tensor:
    """index, its first entry repeated up to a multiple of `bucket` but not past the batch size
    (the extra samples' results are computed and not used)."""
    extra = min(-index.numel() % bucket, batch - index.numel())
    return index if extra <= 0 else torch.cat([index, index[:1].expand(extra)])


class _FrozenBlock:
    """A residual block with BatchNorm folded: the shortcut (projection) runs on every sample,
    the residual branch (`_run`) on the executing ones."""

    def __init__(self, block, dtype):
        self.project = None if block.downsample is None else FoldedConv(block.downsample[0], block.downsample[1], dtype)

    def __call__(self, x: torch.Tensor, index: torch.Tensor | None, bucket: int,
                 use_triton: bool | None = None) -> torch.Tensor:
        """x_{n+1} for the executing samples `index` (None: all). May overwrite x."""
        shortcut = x if self.project is None else self.project(x)
        if index is not None and index.numel() == 0:
            return shortcut
        run = None if index is None else _padded(index, bucket, x.shape[0])
        return self._run(x, shortcut, index, run, use_triton)


class FrozenBottleneck(_FrozenBlock):
    def __init__(self, block: Bottleneck, dtype):
        super().__init__(block, dtype)
        self.w1, self.b1 = FoldedConv(block.conv1, block.bn1, dtype).as_matrix()
        self.conv2 = FoldedConv(block.conv2, block.bn2, dtype)
        self.w3, self.b3 = FoldedConv(block.conv3, block.bn3, dtype).as_matrix()

    def _run(self, x, shortcut, index, run, use_triton):
        hw = x.shape[2] * x.shape[3]
        y1 = gather_linear(rows(x), self.w1, self.b1, run, hw, relu=True, use_triton=use_triton)
        y1 = y1.view(-1, x.shape[2], x.shape[3], self.w1.shape[1]).permute(0, 3, 1, 2)
        y2 = self.conv2.relu(y1)
        linear_scatter_(rows(y2), self.w3, self.b3, rows(shortcut), index, y2.shape[2] * y2.shape[3],
                        use_triton=use_triton)
        return shortcut


class FrozenBasicBlock(_FrozenBlock):
    def __init__(self, block: BasicBlock, dtype):
        super().__init__(block, dtype)
        self.conv1 = FoldedConv(block.conv1, block.bn1, dtype)
        self.conv2 = FoldedConv(block.conv2, block.bn2, dtype)

    def _run(self, x, shortcut, index, run, use_triton):
        selected = x if index is None else x[run]  # advanced indexing keeps channels_last
        out = self.conv2(self.conv1.relu(selected))
        if index is None:
            return out.add_(shortcut).relu_()
        out = out[:index.numel()]
        return shortcut.index_copy_(0, index, out.add_(shortcut[index]).relu_())
