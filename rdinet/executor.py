"""Running one residual block under per-sample gates.

A skipped block passes x_n through (eq. 1); a block that changes shape cannot, so skipping it
runs only its shortcut projection. `run_masked` computes the block for every sample and blends
(eqs. 1 and 9: needed for training with relaxed gates). `run_selected` runs the block only on the
samples whose hard gate is 1 (inference that really skips).
"""

from __future__ import annotations

import torch

from . import kernels, routers


def run_masked(block, x: torch.Tensor, gate: torch.Tensor, with_mean: bool = False):
    """x_{n+1} = v F(x_n) + (1 - v) shortcut(x_n) for gates v of shape (B,).

    with_mean=True returns (x_{n+1}, GAP(x_{n+1})), the GAP the next block's router starts from.
    On a GPU the blend, the GAP and their backward are Triton kernels (kernels.blend); under
    torch.compile and elsewhere, torch ops (which torch.compile fuses itself)."""
    shortcut = block.shortcut(x)
    residual = block.residual(x)
    if kernels.kernels_serve(residual) and kernels.blend_fits(residual, shortcut, gate):
        return kernels.blend(residual, shortcut, gate, with_mean)
    out = block.relu(residual + shortcut)
    dtype = torch.promote_types(shortcut.dtype, out.dtype)
    v = gate.to(dtype).view(-1, 1, 1, 1)
    # lerp is exact at v = 0 and v = 1, and one pass over memory instead of four.
    out = torch.lerp(shortcut.to(dtype), out.to(dtype), v)
    return (out, routers.channel_mean(out)) if with_mean else out


def run_selected(block, x: torch.Tensor, gate: torch.Tensor, inplace: bool = False,
                 bucket: int = 1) -> torch.Tensor:
    """Same result as run_masked for hard 0/1 gates, computing the block only where gate == 1.

    inplace=True writes the executed samples into x itself (or into the shortcut projection)
    instead of a copy; only for inference without autograd, where x is not needed afterwards.
    bucket > 1 rounds the number of samples the block runs on up to a multiple of `bucket`
    (repeating one executed sample), so the convolutions see few distinct batch sizes.
    """
    index = (gate > 0.5).nonzero().squeeze(1)  # the one host sync per block
    shortcut = block.shortcut(x)
    executed, batch = index.numel(), x.shape[0]
    if executed == 0:
        return shortcut
    padded = min(batch, -(-executed // bucket) * bucket)
    if padded == batch:
        out = block.relu(block.residual(x) + shortcut)
        if executed == batch:
            return out
        keep = (gate > 0.5).view(-1, 1, 1, 1)
        return torch.where(keep, out, shortcut.to(out.dtype))
    run_index = index if padded == executed else torch.cat([index, index[:1].expand(padded - executed)])
    # Advanced indexing keeps channels_last (index_select does not).
    selected = x[run_index]
    selected_shortcut = selected if block.downsample is None else shortcut[run_index]
    out = block.relu(block.residual(selected) + selected_shortcut)[:executed]
    dtype = torch.promote_types(shortcut.dtype, out.dtype)
    if inplace and shortcut.dtype == dtype:
        target = shortcut
    else:
        target = shortcut.to(dtype, copy=True, memory_format=torch.preserve_format)
    return target.index_copy_(0, index, out.to(dtype))
