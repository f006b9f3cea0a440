"""Relational routers (paper eqs. 3-8, docs/method.md).

Router n: s_hat = GAP(x_n); s_tilde = ReLU(FC(s_hat; C_n -> d));
S_n = (s_{n-r}, ..., s_{n-1}, s_tilde); s_n = ReLU(A S_n W_n)[last row]; logits = FC(s_n; d -> 2).
norm="batch" puts a BatchNorm before each ReLU (after FC and after the GCN), as ConvNet-AIG's gate
has one (docs/method.md says why: GAP features are mostly a part all images share, which leaves the
paper's router too little difference between images to decide on).

Only the last row of A S_n W_n is used, so the router computes (a^T S_n) W_n with a = the last
row of A: weights (gamma^k, ..., gamma^1, 1) over the rows of S_n (docs/method.md: the transpose of
eq. 4 as printed), or cosine similarities to s_tilde when gamma = "auto" (Table 3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EXECUTE = 1  # index of the "execute" logit; index 0 is "skip"
NORMS = ("none", "batch")


def relation_matrix(rows: int, gamma: float) -> torch.Tensor:
    """The (rows x rows) relation graph, oriented so that row m aggregates nodes n <= m with
    weight gamma^(m - n) (the transpose of eq. 4 as printed); its last row is what a router uses."""
    m = torch.arange(rows).view(-1, 1)
    n = torch.arange(rows).view(1, -1)
    distance = (m - n).clamp(min=0).to(torch.float64)
    weights = torch.where(m >= n, torch.full_like(distance, gamma).pow(distance), torch.zeros_like(distance))
    return weights.float()


def relation_weights(rows: int, gamma: float) -> torch.Tensor:
    """Weights (gamma^(rows-1), ..., gamma^1, 1) of the current node over the rows of S_n."""
    return relation_matrix(rows, gamma)[-1]


class RelationalRouter(nn.Module):
    """Router of one block. forward(x_n, previous[, pooled]) -> (s_n, logits); `previous` holds the
    router features s_{n-k} of earlier routers (oldest first); only the last r are used."""

    def __init__(self, in_channels: int, d: int = 256, r: int = 2, gamma: float | str = 0.5, norm: str = "none"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"router norm={norm!r} is not known; accepted values: {NORMS}")
        self.r = r
        self.gamma = gamma
        self.norm = norm
        self.align = nn.Linear(in_channels, d)  # w_n^0, eq. 6
        self.gcn = nn.Linear(d, d, bias=False)  # w_n^1, eq. 7
        self.decide = nn.Linear(d, 2)  # w_n^2, eq. 8
        self.align_norm = nn.BatchNorm1d(d) if norm == "batch" else nn.Identity()
        self.gcn_norm = nn.BatchNorm1d(d) if norm == "batch" else nn.Identity()

    def num_rows(self, available: int) -> int:
        """Rows of S_n given `available` preceding router features (gamma = 0 needs none)."""
        if self.gamma == 0:
            return 1
        return min(self.r, available) + 1

    def forward(self, x: torch.Tensor, previous: list[torch.Tensor],
                pooled: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """pooled: GAP(x) (B, C) when already computed (the previous block's blend sums it).

        The router computes in its weights' dtype (fp32 in mixed precision), outside autocast:
        autocast would cast its five weight tensors to bf16 at every call and their gradients
        back, ten kernels a router per step for matmuls too small to gain much from bf16."""
        pooled = channel_mean(x) if pooled is None else pooled
        with torch.autocast(pooled.device.type, enabled=False):
            return self._route(pooled.to(self.align.weight.dtype), previous)

    def _route(self, pooled: torch.Tensor, previous: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        s_tilde = F.relu(self.align_norm(self.align(pooled)))
        rows = self.num_rows(len(previous))
        if rows == 1:
            aggregated = s_tilde
        else:
            used = previous[len(previous) - rows + 1:]
            if self.gamma == "auto":
                stacked = torch.stack([*used, s_tilde], dim=1).to(s_tilde.dtype)  # (B, rows, d)
                aggregated = torch.bmm(self._cosine_weights(stacked), stacked).squeeze(1)
            else:
                # sum_k gamma^k s_{n-k}: one fused multiply-add per preceding router, no stacking
                # (routers run once per block, so their kernel count sets the step time).
                aggregated = s_tilde
                for k, s_prev in enumerate(reversed(used), start=1):
                    aggregated = torch.add(aggregated, s_prev.to(s_tilde.dtype), alpha=float(self.gamma) ** k)
        s_n = F.relu(self.gcn_norm(self.gcn(aggregated)))
        return s_n, self.decide(s_n)

    @staticmethod
    def _cosine_weights(stacked: torch.Tensor) -> torch.Tensor:
        """gamma = "auto": edge weights (B, 1, rows) = cosine similarity of each row to s_tilde."""
        unit = F.normalize(stacked, dim=-1)
        cosine = torch.bmm(unit[:, :-1], unit[:, -1:].transpose(1, 2)).squeeze(-1)  # (B, rows-1)
        current = torch.ones(stacked.shape[0], 1, dtype=cosine.dtype, device=cosine.device)
        return torch.cat([cosine, current], dim=1).unsqueeze(1)


def channel_mean(x: torch.Tensor) -> torch.Tensor:
    """GAP, (B, C, H, W) -> (B, C), whose gradient stays an expanded view of (B, C, 1, 1).

    Autograd's own backward of mean writes that gradient out in full, in NCHW order; added to the
    channels_last gradient of x from the block, it then runs PyTorch's slow mixed-layout kernel.
    (torch.compile does its own fusion: plain mean there.)"""
    if torch.compiler.is_compiling():
        return x.mean(dim=(2, 3))
    return _ChannelMean.apply(x)


class _ChannelMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, grad):
        batch, channels, height, width = ctx.shape
        return (grad / (height * width)).view(batch, channels, 1, 1).expand(batch, channels, height, width)
