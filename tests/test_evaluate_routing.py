"""pipeline.evaluate's routing metrics (how decisively routers decide, the eval rule against soft
gates) against direct computations over the whole evaluation set."""
import pytest
import torch

from pipeline.evaluate import evaluate
from rdinet import create_model

CFG = {"data": {"dataset": "cifar10", "image_size": 224}}


def batches(images, labels, size):
    """A loader: the evaluation set in batches of `size`; the last padded with label -1."""
    pad = -len(images) % size
    images = torch.cat([images, images[:pad]])
    labels = torch.cat([labels, torch.full((pad,), -1)])
    return [(images[i:i + size], labels[i:i + size]) for i in range(0, len(images), size)]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = create_model("resnet20", d=16, router_norm="batch").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):  # routers that differ between images; BatchNorm statistics that are not the initial ones
        out = model(torch.randn(32, 3, 8, 8))
        (out.logits.logsumexp(1).mean() + (out.gates.mean(0) - 0.5).pow(2).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    images, labels = torch.randn(23, 3, 8, 8), torch.randint(0, 10, (23,))
    return model.eval(), images, labels


def test_routing_metrics_equal_direct_computation(trained):
    model, images, labels = trained
    metrics = evaluate(model, model, batches(images, labels, 8), None, "joint", CFG, bf16=False)
    with torch.no_grad():
        hard = model(images)
        model.eval_gates = "soft"
        soft = model(images)
        model.eval_gates = "hard"
    margins, gates = hard.margins.double(), hard.gates.double()
    prob = torch.sigmoid(margins / model.tau)
    assert metrics["samples"] == 23
    assert metrics["top1"] == pytest.approx(float((hard.logits.argmax(1) == labels).double().mean()))
    assert metrics["top1_soft"] == pytest.approx(float((soft.logits.argmax(1) == labels).double().mean()))
    assert metrics["soft_gap"] == pytest.approx(metrics["top1_soft"] - metrics["top1"])
    assert metrics["indecisive_share"] == pytest.approx(float((margins.abs() < 1).double().mean()))
    assert metrics["mean_abs_margin"] == pytest.approx(float(margins.abs().mean()), rel=1e-5)
    assert metrics["block_indecisive_share"] == pytest.approx((margins.abs() < 1).double().mean(0).tolist())
    assert metrics["block_mean_abs_margin"] == pytest.approx(margins.abs().mean(0).tolist(), rel=1e-5)
    assert metrics["block_prob_std"] == pytest.approx(prob.std(0, unbiased=False).tolist(), rel=1e-4, abs=1e-6)
    assert metrics["image_rate_std"] == pytest.approx(float(gates.mean(1).std(unbiased=False)), rel=1e-4, abs=1e-6)
    assert metrics["block_rates"] == pytest.approx(gates.mean(0).tolist())
    assert 0 < metrics["indecisive_share"] < 1, "the test needs decisive and indecisive decisions"


def test_routing_metrics_do_not_depend_on_the_batch_size(trained):
    model, images, labels = trained
    a = evaluate(model, model, batches(images, labels, 5), None, "joint", CFG, bf16=False)
    b = evaluate(model, model, batches(images, labels, 23), None, "joint", CFG, bf16=False)
    for key in ("top1", "top1_soft", "indecisive_share", "exec_rate", "ratio"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_static_evaluation_has_no_routing_metrics(trained):
    model, images, labels = trained
    metrics = evaluate(model, model, batches(images, labels, 8), None, "full", CFG, bf16=False)
    assert metrics["ratio"] == pytest.approx(1.0) and "indecisive_share" not in metrics and "top1_soft" not in metrics
    assert model.mode == "full" and model.eval_gates == "hard"
