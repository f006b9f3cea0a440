"""Cost loss (eq. 15, batch mean) and the total objective (eq. 16) against loop references."""

import pytest
import torch
import torch.nn.functional as F

from rdinet.losses import cost_loss, total_loss
from rdinet.srm import rank_loss


def reference_cost_loss(gates, t):
    batch, blocks = gates.shape
    total = 0.0
    for n in range(blocks):
        mean = sum(gates[b, n].item() for b in range(batch)) / batch
        total += (mean - t) ** 2
    return total


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_cost_loss_matches_loop_reference(t):
    torch.manual_seed(0)
    gates = torch.rand(7, 11, requires_grad=True)
    loss = cost_loss(gates, t)
    assert loss.item() == pytest.approx(reference_cost_loss(gates, t), rel=1e-6)
    loss.backward()
    # d/dv_bn = 2 (mean_n - t) / B
    expected = 2 * (gates.detach().mean(0) - t) / 7
    torch.testing.assert_close(gates.grad, expected.expand(7, 11))


def test_network_cost_constrains_only_the_mean_rate_over_blocks():
    torch.manual_seed(0)
    gates = torch.rand(7, 11, requires_grad=True)
    loss = cost_loss(gates, 0.3, over="network")
    mean = sum(gates[b, n].item() for b in range(7) for n in range(11)) / 77
    assert loss.item() == pytest.approx(11 * (mean - 0.3) ** 2, rel=1e-6)
    loss.backward()
    # d/dv_bn = 2 * 11 * (mean - t) / (B * N): one pull, the same on every block
    torch.testing.assert_close(gates.grad, torch.full((7, 11), 2 * (mean - 0.3) / 7))
    uniform = torch.full((4, 11), 0.8)  # every block misses t alike: eq. 15's value
    assert cost_loss(uniform, 0.3, over="network").item() == pytest.approx(cost_loss(uniform, 0.3).item())
    # rates that differ between blocks but meet t on average cost nothing
    assert cost_loss(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 0.5, over="network").item() == 0
    with pytest.raises(ValueError, match="over='image'"):
        cost_loss(gates, 0.3, over="image")


def test_total_loss_combines_the_terms():
    torch.manual_seed(1)
    logits, targets = torch.randn(6, 5), torch.randint(0, 5, (6,))
    gates, hist = torch.rand(6, 4), torch.rand(6, 9)
    parts = total_loss(logits, targets, gates, hist, t=0.4, alpha=0.2)
    cls = -sum(torch.log_softmax(logits[b], 0)[targets[b]].item() for b in range(6)) / 6
    assert parts["cls"].item() == pytest.approx(cls, rel=1e-6)
    assert parts["cost"].item() == pytest.approx(reference_cost_loss(gates, 0.4), rel=1e-6)
    assert parts["rank"].item() == pytest.approx(rank_loss(gates, hist).item())
    assert parts["rank"].item() > 0
    expected = parts["cls"] + parts["cost"] + 0.2 * parts["rank"]
    assert parts["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    no_srm = total_loss(logits, targets, gates, None, t=0.4, alpha=0)
    assert no_srm["rank"].item() == 0 and no_srm["loss"].item() == pytest.approx(
        (F.cross_entropy(logits, targets) + cost_loss(gates, 0.4)).item(), rel=1e-6)


def test_loss_bad_input():
    gates = torch.rand(4, 3)
    with pytest.raises(ValueError, match="t=1.5"):
        cost_loss(gates, 1.5)
    with pytest.raises(ValueError, match=r"gates must be a \(B, N\)"):
        cost_loss(torch.rand(4), 0.5)
    logits, targets = torch.randn(4, 3), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="alpha=-0.1"):
        total_loss(logits, targets, gates, torch.rand(4, 6), t=0.5, alpha=-0.1)
    with pytest.raises(ValueError, match="needs hist"):
        total_loss(logits, targets, gates, None, t=0.5, alpha=0.2)
