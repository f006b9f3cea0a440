"""Training objective (eq. 16): L = L_cls + L_cost + alpha * L_rank."""

from __future__ import annotations

from numbers import Real

import torch
import torch.nn.functional as F

from .srm import rank_loss


COST_OVER = ("block", "network")


def cost_loss(gates: torch.Tensor, t: float, over: str = "block") -> torch.Tensor:
    """Eq. 15 with docs/method.md's batch mean: sum_n (mean over the batch of v_n - t)^2; gates (B, N).
    over="network" (not in the paper) constrains only the mean rate over all blocks,
    N * (mean_n rate_n - t)^2, equal to eq. 15 when every block misses t alike; each block's
    rate is then free, as SkipNet's and BlockDrop's whole-network cost leaves it."""
    _check_gates(gates)
    _check_rate(t)
    if over not in COST_OVER:
        raise ValueError(f"over={over!r}: the cost is taken over one of {COST_OVER}")
    rates = gates.float().mean(dim=0)
    if over == "network":
        return rates.numel() * (rates.mean() - t) ** 2
    return ((rates - t) ** 2).sum()


def total_loss(logits: torch.Tensor, targets: torch.Tensor, gates: torch.Tensor, hist: torch.Tensor | None,
               t: float, alpha: float, phi: float = 0.5, tie_eps: float = 1e-3,
               cost_over: str = "block") -> dict[str, torch.Tensor]:
    """Returns {"loss", "cls", "cost", "rank"}. hist: (B, K) colour histograms of the batch
    (rdinet.srm.color_histograms); may be None only when alpha == 0."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or alpha < 0:
        raise ValueError(f"alpha={alpha!r} (weight of the rank loss) must be a number >= 0")
    cls = F.cross_entropy(logits.float(), targets)
    cost = cost_loss(gates, t, cost_over)
    if alpha == 0 and hist is None:
        rank = gates.sum() * 0.0
    elif hist is None:
        raise ValueError(f"alpha={alpha} > 0 needs hist, the batch's colour histograms (srm.color_histograms)")
    else:
        rank = rank_loss(gates, hist, phi=phi, tie_eps=tie_eps)
    loss = cls + cost + alpha * rank
    return {"loss": loss, "cls": cls, "cost": cost, "rank": rank}


def _check_gates(gates) -> None:
    if not isinstance(gates, torch.Tensor) or gates.dim() != 2:
        shape = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates must be a (B, N) tensor of per-block decisions; got {shape}")


def _check_rate(t) -> None:
    if isinstance(t, bool) or not isinstance(t, Real) or not 0 <= t <= 1:
        raise ValueError(f"t={t!r} (target execution rate) must be a number in [0, 1]")
