"""SRM (eqs. 10-12): colour histograms against numpy, the rank loss against a loop reference."""

import math

import numpy as np
import pytest
import torch

from rdinet.srm import color_histograms, rank_loss

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def numpy_histograms(values: np.ndarray, bins: int) -> np.ndarray:
    rows = []
    for image in values:
        per_channel = []
        for channel in image:
            counts, _ = np.histogram(channel, bins=bins, range=(0, 256))
            per_channel.append(counts / counts.sum())
        rows.append(np.concatenate(per_channel))
    return np.stack(rows)


@pytest.mark.parametrize("bins", [16, 8, 10, 1])
def test_uint8_histograms_match_numpy(bins):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 7, 9), dtype=torch.uint8)
    images[0] = 255  # the top of the range
    images[1, :, 0] = 0
    hist = color_histograms(images, bins=bins)
    assert hist.shape == (5, 3 * bins) and hist.dtype == torch.float32
    np.testing.assert_allclose(hist.numpy(), numpy_histograms(images.numpy(), bins), atol=1e-7)
    np.testing.assert_allclose(hist.view(5, 3, bins).sum(-1).numpy(), 1.0, atol=1e-6)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_normalised_float_histograms_match_numpy_of_denormalised(memory_format):
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, (4, 3, 12, 10)).float()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    normalised = ((pixels - mean) / std).contiguous(memory_format=memory_format)
    hist = color_histograms(normalised, bins=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    denormalised = (normalised * std + mean).numpy()  # what the network's input stands for
    denormalised = np.clip(denormalised, 0, 255)  # round-off below 0 belongs to the first bin
    np.testing.assert_allclose(hist.numpy(), numpy_histograms(denormalised, 16), atol=1e-7)


def test_float_round_trip_equals_uint8_when_exact():
    torch.manual_seed(2)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    normalised = (images.float() - 128) / 64  # exactly representable both ways
    torch.testing.assert_close(
        color_histograms(normalised, mean=(128,) * 3, std=(64,) * 3), color_histograms(images)
    )


def test_histogram_bad_input():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        color_histograms(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        color_histograms(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mean and std"):
        color_histograms(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="bins=0"):
        color_histograms(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), bins=0)
    with pytest.raises(ValueError, match="dtype torch.int64"):
        color_histograms(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="std=.*> 0"):
        color_histograms(torch.zeros(2, 3, 8, 8), mean=(0, 0, 0), std=(1, 0, 1))
    with pytest.raises(ValueError, match="mean must hold 3 values"):
        color_histograms(torch.zeros(2, 3, 8, 8), mean=(0, 0), std=(1, 1, 1))


def reference_rank_loss(paths, hist, phi, tie_eps):
    """Eq. 12 with loops: D from hist, rows sorted ascending with i first (ties by index)."""
    paths, hist = paths.tolist(), hist.tolist()
    size = len(paths)

    def dist(u, v):
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))

    terms = []
    for i in range(size):
        d = [dist(hist[i], hist[j]) for j in range(size)]
        order = sorted(range(size), key=lambda j: (j != i, d[j], j))
        assert order[0] == i
        for j in range(1, size - 1):  # j = 2 .. L-1 in the paper's 1-based indexing
            pos, neg = order[j], order[j + 1]
            if abs(d[pos] - d[neg]) <= tie_eps * max(d[neg], 1e-38):
                continue
            terms.append(max(0.0, dist(paths[i], paths[pos]) - dist(paths[i], paths[neg]) + phi))
    return sum(terms) / len(terms) if terms else 0.0, len(terms)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rank_loss_matches_loop_reference(seed):
    torch.manual_seed(seed)
    paths = torch.rand(9, 6)
    hist = torch.rand(9, 12)
    hist = hist / hist.sum(1, keepdim=True)
    for phi in (0.5, 0.1):
        expected, kept = reference_rank_loss(paths, hist, phi, 1e-3)
        assert kept > 9 * 7 - 5  # random near ties are rare
        assert rank_loss(paths, hist, phi=phi).item() == pytest.approx(expected, rel=1e-5)


def test_rank_loss_ignores_ties_from_duplicate_histograms():
    torch.manual_seed(3)
    hist = torch.rand(10, 6)
    hist[3] = hist[1]  # duplicates: distance 0 to each other, equal distances from everyone else
    hist[7] = hist[1]
    hist[5] = hist[2]
    hist[8] = hist[2] * (1 + 1e-5)  # a near tie, inside tie_eps
    paths = torch.rand(10, 5)
    expected, kept = reference_rank_loss(paths, hist, 0.5, 1e-3)
    assert kept < 10 * 8
    assert rank_loss(paths, hist).item() == pytest.approx(expected, rel=1e-5)
    # Without tie handling more triplets would count and the value would change.
    loose, kept_all = reference_rank_loss(paths, hist, 0.5, 0.0)
    assert kept_all > kept and rank_loss(paths, hist, tie_eps=0.0).item() == pytest.approx(loose, rel=1e-5)


def test_rank_loss_gradient_and_degenerate_batches():
    torch.manual_seed(4)
    paths = torch.rand(6, 4, requires_grad=True)
    paths_dup = paths.detach().clone()
    paths_dup[2] = paths_dup[1]  # equal paths: the norm's gradient at 0 must stay finite
    paths_dup.requires_grad_(True)
    for p in (paths, paths_dup):
        loss = rank_loss(p, torch.rand(6, 8))
        loss.backward()
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    same = rank_loss(paths, torch.ones(6, 8))  # every triplet is a tie
    assert same.item() == 0.0 and same.requires_grad
    same.backward()
    tiny = rank_loss(paths[:2], torch.rand(2, 8))  # no triplet in a batch of 2
    assert tiny.item() == 0.0 and tiny.requires_grad


def test_rank_loss_bad_input():
    with pytest.raises(ValueError, match="same batch size"):
        rank_loss(torch.rand(4, 3), torch.rand(5, 6))
    with pytest.raises(ValueError, match="2-D"):
        rank_loss(torch.rand(4), torch.rand(4, 6))
    with pytest.raises(ValueError, match="phi=-1"):
        rank_loss(torch.rand(4, 3), torch.rand(4, 6), phi=-1)
