"""Sample Relation Module (paper eqs. 10-12, docs/method.md): colour histograms and the rank loss."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from . import kernels


@torch.no_grad()
def color_histograms(images: torch.Tensor, bins: int = 16, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """Per-channel histograms H(X) of a batch: (B, 3, H, W) -> (B, 3 * bins) float32.

    uint8 images are taken as 0..255. Float images are normalised ones, de-normalised with
    `mean` and `std` given in 0..255 units (x * std + mean); pass mean=(0, 0, 0), std=(1, 1, 1)
    for float images already in 0..255. Bins are equal-width over [0, 256); each channel's
    histogram sums to 1; values outside [0, 256) after de-normalising (round-off) count in the
    end bins. Runs on the images' device: on a GPU as one Triton kernel (rdinet.kernels), under
    torch.compile and elsewhere as torch ops (use_triton=True/False chooses).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (B, 3, H, W); got {shape}")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 256:
        raise ValueError(f"bins={bins!r} must be an integer in [1, 256]")
    batch, channels = images.shape[:2]
    use_triton = kernels.kernels_serve(images, use_triton)
    if images.dtype == torch.uint8:
        if mean is not None or std is not None:
            raise ValueError("mean/std apply to normalised float images; uint8 images are already 0..255")
        if use_triton:
            return kernels.channel_histograms(images, bins)
        index = images.long() * bins // 256
    elif images.is_floating_point():
        if mean is None or std is None:
            raise ValueError(
                "float images need mean and std (0..255 units) to be de-normalised; pass "
                "mean=(0, 0, 0), std=(1, 1, 1) for float images already in 0..255"
            )
        if use_triton:
            mean_t, std_t = _mean_std(mean, std, images.device)
            return kernels.channel_histograms(images, bins, mean_t.view(-1), std_t.view(-1))
        values = denormalise(images, mean, std)
        index = torch.floor(values * (bins / 256.0)).long().clamp_(0, bins - 1)
    else:
        raise ValueError(f"images must be uint8 (0..255) or floating point; got dtype {images.dtype}")
    # One flat bin id per pixel: channel c owns bins [c * bins, (c + 1) * bins).
    offsets = torch.arange(channels, device=images.device).view(1, channels, 1, 1) * bins
    flat = (index + offsets).reshape(batch, -1)
    counts = torch.zeros(batch, channels * bins, dtype=torch.float32, device=images.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts / float(images.shape[2] * images.shape[3])


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised (B, 3, H, W) images back to float 0..255: x * std + mean, both in 0..255 units."""
    mean_t, std_t = _mean_std(mean, std, images.device)
    return images.float() * std_t + mean_t


def _mean_std(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked per-channel mean and std as (1, 3, 1, 1) tensors on `device`: cached in eager mode;
    under torch.compile made in the graph, which holds them as constants (Dynamo would trace
    through the cache rather than keep it)."""
    key = (_per_channel(mean, "mean"), _per_channel(std, "std"), device)
    if torch.compiler.is_compiling():
        return _as_tensors(*key)
    return _denormaliser(*key)


def _per_channel(values, name: str) -> tuple[float, float, float]:
    """Three per-channel numbers, checked on the host (a check on the GPU would wait for it)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().flatten().tolist()
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"{name} must hold 3 values (one per channel, 0..255 units); got {values!r}")
    if name == "std" and not all(v > 0 for v in values):
        raise ValueError(f"std={values} must be > 0 for every channel")
    return values


def _as_tensors(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))


@functools.lru_cache(maxsize=16)
def _denormaliser(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """_as_tensors, made once: copying them from the host at every training step would make the
    host wait for the GPU each time."""
    return _as_tensors(mean, std, device)


def rank_loss(paths: torch.Tensor, hist: torch.Tensor, phi: float = 0.5, tie_eps: float = 1e-3) -> torch.Tensor:
    """L_rank (eq. 12) averaged over the kept triplets.

    paths: (L, N) relaxed executing paths P_i = (v_1..v_N); hist: (L, K) image descriptors H(X_i).
    D = pairwise distances of hist; M = argsort(D) row-wise (M_i1 = i); for j = 2..L-1 the
    triplet (i, M_ij, M_i,j+1) adds [||P_i - P_Mij|| - ||P_i - P_Mi,j+1|| + phi]_+. Triplets
    whose two histogram distances to the anchor tie (relative difference <= tie_eps) are ignored.
    """
    if paths.dim() != 2 or hist.dim() != 2 or paths.shape[0] != hist.shape[0]:
        raise ValueError(
            f"paths (L, N) and hist (L, K) must be 2-D with the same batch size L; got "
            f"{tuple(paths.shape)} and {tuple(hist.shape)}"
        )
    if phi < 0 or tie_eps < 0:
        raise ValueError(f"phi={phi} and tie_eps={tie_eps} must be >= 0")
    size = paths.shape[0]
    if size < 3:
        return paths.sum() * 0.0
    hist = hist.detach().float()
    exact = "donot_use_mm_for_euclid_dist"  # the matmul shortcut loses precision on near ties
    hist_dist = torch.cdist(hist, hist, compute_mode=exact)
    order_key = hist_dist.clone()
    order_key.fill_diagonal_(float("-inf"))  # each sample ranks first among its neighbours
    order = torch.argsort(order_key, dim=1, stable=True)
    positive, negative = order[:, 1:-1], order[:, 2:]
    d_pos, d_neg = hist_dist.gather(1, positive), hist_dist.gather(1, negative)
    keep = (d_neg - d_pos).abs() > tie_eps * d_neg.clamp(min=torch.finfo(torch.float32).tiny)
    path_dist = torch.cdist(paths.float(), paths.float(), compute_mode=exact)
    hinge = F.relu(path_dist.gather(1, positive) - path_dist.gather(1, negative) + phi)
    # Mean over kept triplets; 0 (with a graph) when none is kept. No host sync.
    return (hinge * keep).sum() / keep.sum().clamp(min=1)
