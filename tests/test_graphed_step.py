"""train.cuda_graph on a GPU: the captured step (pipeline.graphed_step) trains exactly as the
uncaptured one, follows the scheduler's learning rate, and its replay never waits for the GPU."""
import copy

import pytest
import torch

import rdinet
from pipeline.build import make_loss_terms
from pipeline.config import DEFAULTS
from pipeline.graphed_step import GraphedStep
from pipeline.step import TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MEAN, STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, nesterov=True, fused=True)


def batches(n, size=32):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(size, 3, 32, 32, generator=gen).cuda().contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (size,), generator=gen).cuda()) for _ in range(n)]


def net(mode):
    torch.manual_seed(0)
    model = rdinet.create_model("resnet20", num_classes=10, d=32).cuda().set_mode(mode).train()
    return model.to(memory_format=torch.channels_last)


def test_graphed_static_steps_match_uncaptured_steps_with_a_changing_lr(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    loss_terms = make_loss_terms("full", DEFAULTS["loss"], MEAN, STD)
    data, lrs = batches(4), [0.1, 0.05, 0.02, 0.01]
    eager = net("full")
    graphed = copy.deepcopy(eager)
    before = {k: v.clone() for k, v in graphed.state_dict().items()}
    eager_opt, graphed_opt = sgd(eager), sgd(graphed)
    for (images, labels), lr in zip(data, lrs):
        eager_opt.param_groups[0]["lr"] = lr
        loss_terms(images, eager(images).logits, None, labels)["loss"].backward()
        eager_opt.step()
        eager_opt.zero_grad(set_to_none=True)

    step = GraphedStep(graphed, graphed_opt, loss_terms, *data[0], bf16=False)
    for name, value in graphed.state_dict().items():  # the warm-up steps left no trace
        assert torch.equal(value, before[name]), name
    assert all(torch.count_nonzero(s["momentum_buffer"]) == 0 for s in graphed_opt.state.values())
    for (images, labels), lr in zip(data, lrs):
        graphed_opt.param_groups[0]["lr"] = lr  # as the scheduler sets it
        step(images, labels)
    assert isinstance(graphed_opt.param_groups[0]["lr"], float)  # checkpoints keep a float
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
    assert not torch.equal(graphed.fc.weight, before["fc.weight"])  # and both trained


@pytest.mark.parametrize("compiled", [False, True])
def test_graphed_joint_step_trains_and_its_replay_never_waits_for_the_gpu(compiled):
    model = net("joint")
    loss_terms = make_loss_terms("joint", DEFAULTS["loss"], MEAN, STD)
    if compiled:
        model.compile()
        loss_terms = torch.compile(loss_terms)
    optimizer = sgd(model)
    data = batches(3, size=64)
    step = GraphedStep(model, optimizer, loss_terms, *data[0], bf16=True)
    router = next(model.router_parameters())
    start = router.detach().clone()
    losses = []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for images, labels in data:
            terms, gates = step(images, labels)
            losses.append(terms["loss"].clone())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert gates.shape[0] == 64
    assert all(torch.isfinite(loss) for loss in losses)
    assert len({float(loss) for loss in losses}) == len(losses)  # a new batch, new weights each replay
    assert not torch.equal(router, start)


def test_train_step_replays_its_capture_until_recapture():
    """TrainStep with cuda_graph, as the trainer drives it: captured on the first call, replayed
    for the calls after, captured again after recapture() (the hard-tail switch)."""
    model = net("joint")
    step = TrainStep(model, sgd(model), make_loss_terms("joint", DEFAULTS["loss"], MEAN, STD), bf16=True,
                     cuda_graph=True)
    data = batches(3, size=64)
    step(*data[0])
    first = step.graphed
    terms, gates, stop = step(*data[1])
    assert step.graphed is first and not stop and gates.shape[0] == 64
    model.straight_through = True
    step.recapture()
    terms, _, _ = step(*data[2])
    assert step.graphed is not first and torch.isfinite(terms["loss"])
