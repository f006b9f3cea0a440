"""Cost accounting from layer shapes against torch.utils.flop_counter."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rdinet import create_model, model_cost
from rdinet.cost import _router_macs, cost_table
from rdinet.routers import RelationalRouter

SMALL_INPUTS = {"resnet20": 32, "resnet32": 32, "resnet56": 32, "resnet110": 32, "resnet50": 64, "resnet101": 64}


def counted_macs(fn, *args):
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("arch", sorted(SMALL_INPUTS))
def test_static_macs_match_flop_counter(arch):
    size = SMALL_INPUTS[arch]
    model = create_model(arch, d=8).set_mode("full").eval()
    with torch.no_grad():
        measured = counted_macs(model, torch.randn(2, 3, size, size)) / 2
    ours = cost_table(model, (3, size, size)).static
    assert ours == pytest.approx(measured, rel=0.01)


def test_reference_numbers_at_full_resolution():
    """Shape arithmetic only: ResNet-50 ~4.1 GMACs at 224 (torchvision: 4.09), ResNet-101 7.8,
    CIFAR ResNet-110 ~0.25 GMACs at 32 (the paper's 0.51 GFLOPs / 2)."""
    r50 = cost_table(create_model("resnet50", d=8), (3, 224, 224)).static / 1e9
    r101 = cost_table(create_model("resnet101", d=8), (3, 224, 224)).static / 1e9
    r110 = cost_table(create_model("resnet110", d=8), (3, 32, 32)).static / 1e9
    assert r50 == pytest.approx(4.09, rel=0.01)
    assert r101 == pytest.approx(7.80, rel=0.01)
    assert r110 == pytest.approx(0.253, rel=0.01)


@pytest.mark.parametrize("gamma", [0.0, 0.5, "auto"])
@pytest.mark.parametrize("available", [0, 1, 3])
def test_router_macs_match_flop_counter(gamma, available):
    router = RelationalRouter(64, d=32, r=2, gamma=gamma)
    x, previous = torch.randn(3, 64, 4, 4), [torch.rand(3, 32) for _ in range(available)]
    measured = counted_macs(router, x, previous) / 3
    assert _router_macs(router, available) == pytest.approx(measured, rel=0.01)


def reference_cost(table, gates, with_routers):
    per_image = []
    for row in gates.tolist():
        macs = table.stem + table.head
        for n, u in enumerate(row):
            macs += table.full[n] if u == 1 else table.skip[n]
        per_image.append(macs + (sum(table.router) if with_routers else 0))
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("mode", ["uniform", "joint"])
def test_reported_cost_is_what_the_skipping_model_computes(mode):
    """With the skip executor the model really computes what model_cost reports."""
    torch.manual_seed(0)
    model = create_model("resnet20", d=16).set_mode(mode).eval()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gates = model(x).gates
    report = model_cost(model, gates, (3, 32, 32))
    table = cost_table(model, (3, 32, 32))
    assert report["gmacs"] * 1e9 == pytest.approx(counter.get_total_flops() / 2 / 16, rel=1e-6)
    assert report["gmacs"] * 1e9 == pytest.approx(reference_cost(table, gates, mode == "joint"), rel=1e-9)
    assert report["gflops"] == pytest.approx(2 * report["gmacs"])
    assert report["ratio"] == pytest.approx(report["gmacs"] * 1e9 / table.static)
    assert report["block_rates"] == pytest.approx(gates.mean(0).tolist())
    assert len(report["block_rates"]) == model.num_blocks


def test_full_network_ratio_and_routers():
    model = create_model("resnet110", d=256)
    ones = torch.ones(4, 54)
    assert model_cost(model.set_mode("full"), ones)["ratio"] == pytest.approx(1.0)
    joint = model_cost(model.set_mode("joint"), ones)
    assert joint["ratio"] > 1.0  # routers cost something
    zeros = model_cost(model.set_mode("uniform"), torch.zeros(4, 54))
    table = cost_table(model, (3, 32, 32))
    assert zeros["gmacs"] * 1e9 == pytest.approx(table.stem + table.head + sum(table.skip))
    assert sum(1 for s in table.skip if s > 0) == 2  # the two projection blocks of CIFAR ResNets


def test_cost_bad_input():
    model = create_model("resnet20", d=8)
    with pytest.raises(ValueError, match="hard 0/1"):
        model_cost(model, torch.full((2, 9), 0.5))
    with pytest.raises(ValueError, match=r"\(B, 9\)"):
        model_cost(model, torch.ones(2, 8))
    with pytest.raises(ValueError, match="input_size"):
        model_cost(model, torch.ones(2, 9), input_size=(32, 32))
    with pytest.raises(ValueError, match="create_model"):
        model_cost(torch.nn.Linear(2, 2), torch.ones(2, 9))
