"""The trainer's step against direct references: the DeepSpeed engine as the trainer prepares it
(one process, ZeRO-0, no all-reduce, fused SGD, channels_last weights) must update the weights
exactly as a plain torch SGD step on the same batches does, without waiting for the device (on a
GPU, in CUDA's sync debug mode) and without copying weight gradients; two such processes must
follow one SGD on the whole batch; the compiled loss terms must equal the eager ones."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.build import make_loss_terms
from pipeline.config import DEFAULTS
from pipeline.trainer import stage_eta
from rdinet import srm
from rdinet.losses import total_loss

REPO = Path(__file__).resolve().parent.parent

# argv: run directory, learning rate. One plain torch SGD (the reference) sees the whole global batch.
ENGINE_SETUP = textwrap.dedent("""
    import copy, sys, torch, torch.nn.functional as F
    import rdinet
    from pipeline.config import load_config
    from pipeline.distributed import make_accelerator
    from pipeline.build import make_optimizer, prepare_engine
    from pipeline.step import StepFlags

    cfg = load_config(None, ["train.deepspeed_config=jobs/deepspeed/zero0.json", "data.batch_size=8",
                             "train.precision=fp32",  # the reference runs in fp32; a GPU would pick bf16
                             "optim.weight_decay=0.01", f"optim.lr={sys.argv[2]}"])
    accelerator = make_accelerator(cfg, sys.argv[1])
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes  # CPU in CI
    torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32 = True, False  # a GPU: deterministic
    torch.manual_seed(0)
    model = rdinet.create_model("resnet20").set_mode("full")
    for p in model.router_parameters():
        p.requires_grad_(False)
    reference = copy.deepcopy(model).to(device)
    params = lambda m: [p for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params(model), cfg["optim"], 8 * world)
    ref_optimizer = torch.optim.SGD(params(reference), lr=optimizer.param_groups[0]["lr"], momentum=0.9,
                                    weight_decay=0.01, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    engine, optimizer, scheduler = prepare_engine(accelerator, model, optimizer, scheduler, "none")
    net = accelerator.unwrap_model(engine)
""")

ENGINE_SCRIPT = ENGINE_SETUP + textwrap.dedent("""
    from torch.utils._python_dispatch import TorchDispatchMode
    assert engine.enable_backward_allreduce is False, "one ZeRO-0 process should skip the all-reduce"
    convs = [p for p in net.parameters() if p.dim() == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs), "weights not channels_last"

    class WeightCopies(TorchDispatchMode):  # copies into convolution weight-shaped tensors
        def __init__(self):
            super().__init__()
            self.count = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "copy_" and tuple(args[0].shape) in weight_shapes:
                self.count += 1
            return func(*args, **(kwargs or {}))
    weight_shapes = {tuple(p.shape) for p in convs}
    copies = 0
    start = copy.deepcopy(reference.state_dict())
    from deepspeed.accelerator import get_accelerator
    accel, syncs = get_accelerator(), []
    device_sync = accel.synchronize
    accel.synchronize = lambda *args: syncs.append(args) or device_sync(*args)
    flags = StepFlags(device)
    walks, step_walks = [], 0  # DeepSpeed's own zero_grad walks the module's named parameters
    net.named_parameters = lambda *a, walk=net.named_parameters, **k: walks.append(1) or walk(*a, **k)
    for step in range(3):
        if device.type == "cuda" and step == 1:  # from the second step on, nothing may wait for the GPU
            torch.cuda.set_sync_debug_mode("error")
        images = torch.randn(8, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)  # as loaded
        labels = torch.randint(0, 10, (8,), device=device)
        loss = F.cross_entropy(engine(images).logits, labels)
        flags.push(False, {"loss": loss}, step)
        weight_copies = WeightCopies()
        walked = len(walks)
        with weight_copies:
            accelerator.backward(loss)
        step_walks += len(walks) - walked
        copies += weight_copies.count
        assert all(p.grad is None for p in net.parameters()), "the engine's step left gradients behind"
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        F.cross_entropy(reference(images).logits, labels).backward()
        ref_optimizer.step(); ref_optimizer.zero_grad()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("default")
    moved = max((p - start[k]).abs().max().item() for k, p in net.named_parameters() if p.requires_grad)
    worst = max((p - q).abs().max().item() for p, q in zip(net.parameters(), reference.parameters()))
    del net.named_parameters
    print(f"moved {moved:.3g} worst {worst:.3g} syncs {len(syncs)} copies {copies} walks {step_walks}")
""")


@pytest.mark.slow  # a DeepSpeed engine in a fresh process: ~25 s on 2 cores
def test_one_zero0_process_updates_weights_as_plain_sgd_does_without_syncing_the_device(tmp_path):
    proc = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, str(tmp_path), "0.5"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("moved"))
    moved, worst, syncs = float(line.split()[1]), float(line.split()[3]), int(line.split()[5])
    assert moved > 1e-3  # the steps changed the weights
    assert worst < 1e-5, line
    # DeepSpeed's throughput timer would synchronise the device in every step from the third on.
    assert syncs == 0, line
    # channels_last weights take their convolutions' gradients as they come (contiguous weights
    # would have each gradient copied into their layout, 19 copies a step for ResNet-20).
    assert int(line.split()[7]) == 0, line
    # the engine's step clears the gradients through the optimizer's list of them, not by walking
    # the module (0.6 ms of host a step for RDI-Net-110)
    assert int(line.split()[9]) == 0, line


# The trainer's step on the engine with train.cuda_graph: TrainStep captures the module and the
# torch SGD behind accelerate's wrappers on the first batch, then replays; the scheduler steps eagerly.
CAPTURED_ENGINE_SCRIPT = ENGINE_SETUP + textwrap.dedent("""
    from pipeline.step import TrainStep
    cross_entropy = lambda images, logits, gates, labels: {"loss": F.cross_entropy(logits.float(), labels)}
    step = TrainStep(engine, optimizer, cross_entropy, scheduler=scheduler, accelerator=accelerator, cuda_graph=True)
    start = [p.detach().clone() for p in net.parameters()]
    losses = []
    for n in range(4):
        images = torch.randn(8, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (8,), device=device)
        terms, _, _ = step(images, labels, n)
        losses.append(float(terms["loss"]))
        F.cross_entropy(reference(images).logits, labels).backward()
        ref_optimizer.step(); ref_optimizer.zero_grad()
    moved = max((p - q).abs().max().item() for p, q in zip(net.parameters(), start))
    worst = max((p - q).abs().max().item() for p, q in zip(net.parameters(), reference.parameters()))
    print(f"captured {step.graphed is not None} losses {len(set(losses))} moved {moved:.3g} worst {worst:.3g}")
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_engines_step_captured_as_one_cuda_graph_updates_weights_as_plain_sgd_does(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CAPTURED_ENGINE_SCRIPT, str(tmp_path), "0.5"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    fields = next(line for line in proc.stdout.splitlines() if line.startswith("captured")).split()
    assert fields[1] == "True" and fields[3] == "4", fields  # replayed on each new batch
    assert float(fields[5]) > 1e-3, fields  # the replays changed the weights
    assert float(fields[7]) < 1e-5, fields


TWO_RANK_SCRIPT = ENGINE_SETUP + textwrap.dedent("""
    layout = all(p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters() if p.dim() == 4)
    start = [p.detach().clone() for p in net.parameters()]
    engine.eval(), reference.eval()  # BatchNorm's running statistics: one function for any split of a batch
    batches = torch.Generator().manual_seed(1)
    for step in range(3):
        images = torch.randn(8 * world, 3, 32, 32, generator=batches).contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, 10, (8 * world,), generator=batches)
        mine = slice(8 * rank, 8 * rank + 8)
        accelerator.backward(F.cross_entropy(engine(images[mine]).logits, labels[mine]))
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
        F.cross_entropy(reference(images).logits, labels).backward()
        ref_optimizer.step(); ref_optimizer.zero_grad()
    moved = max((p - q).abs().max().item() for p, q in zip(net.parameters(), start))
    worst = max((p - q).abs().max().item() for p, q in zip(net.parameters(), reference.parameters()))
    print(f"rank {rank} allreduce {engine.enable_backward_allreduce} channels_last {layout} moved {moved:.3g} worst {worst:.3g}")
""")


@pytest.mark.slow  # two DeepSpeed ranks (torch.distributed.run)
def test_two_zero0_processes_update_weights_as_sgd_on_the_whole_batch_does(tmp_path):
    """The multi-GPU CIFAR path: two ranks, each on its half of the batch, all-reduce channels_last
    weight gradients through DeepSpeed's flattened buckets; the weights must follow one SGD on the
    whole batch. On the CPU (gloo) on every machine: two ranks of NCCL would need two GPUs."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANK_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "run"), "0.05"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": "",
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("rank "))
    assert [line.split()[1] for line in lines] == ["0", "1"], proc.stdout[-2000:]
    for line in lines:
        fields = line.split()
        assert fields[3] == "True" and fields[5] == "True", line  # two ranks all-reduce; weights channels_last
        assert float(fields[7]) > 1e-3, line  # the steps changed the weights
        assert float(fields[9]) < 1e-4, line


@pytest.mark.slow  # torch.compile: ~15 s for the three rows on 2 cores
@pytest.mark.parametrize("mode,cost_over", [("joint", "block"), ("joint", "network"), ("full", "block")])
def test_compiled_loss_terms_equal_the_eager_terms_and_their_gradients(mode, cost_over):
    torch.manual_seed(0)
    images = torch.randn(16, 3, 32, 32)
    logits = torch.randn(16, 10, requires_grad=True)
    gates = torch.rand(16, 9, requires_grad=True)
    labels = torch.randint(0, 10, (16,))
    # on the defaults, so that a key added to the loss section reaches this test too
    loss_cfg = {**DEFAULTS["loss"], "t": 0.5, "alpha": 0.2, "phi": 0.5, "tie_eps": 1e-3, "bins": 16,
                "cost_over": cost_over}
    mean, std = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
    eager = make_loss_terms(mode, loss_cfg, mean, std)(images, logits, gates, labels)
    compiled = torch.compile(make_loss_terms(mode, loss_cfg, mean, std))(images, logits, gates, labels)
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name])
    grads = [torch.autograd.grad(terms["loss"], [logits, gates], allow_unused=True) for terms in (eager, compiled)]
    for g_eager, g_compiled in zip(*grads):
        if g_eager is None:
            assert g_compiled is None
        else:
            torch.testing.assert_close(g_compiled, g_eager)
    if mode == "joint":  # and the eager terms are eq. 16 itself
        hist = srm.color_histograms(images, bins=16, mean=mean, std=std)
        direct = total_loss(logits, labels, gates, hist, t=0.5, alpha=0.2, cost_over=cost_over)
        torch.testing.assert_close(eager["loss"], direct["loss"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("lag", [1, 2])
def test_step_flags_report_stop_and_non_finite_loss_lag_steps_later_without_waiting(device, lag, tmp_path):
    """StepFlags against what each step pushed. On a GPU, CUDA's sync debug mode checks that push
    never synchronises with the stream (the work queued after a step's flags is never waited for)."""
    import torch.distributed as dist
    from pipeline.step import StepFlags

    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path / 'pg'}",
                            rank=0, world_size=1)
    try:
        flags = StepFlags(torch.device(device), lag=lag)
        pushed = [(False, 1.0), (False, float("nan")), (True, 3.0), (False, 4.0)]
        # made before the sync check: a tensor copied from the host synchronises
        terms = [{"loss": torch.tensor(loss, device=device), "cls": torch.tensor(2.0, device=device)}
                 for _, loss in pushed]
        outcomes = []
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for step, ((stop, _), step_terms) in enumerate(zip(pushed, terms), start=1):
                outcomes.append(flags.push(stop, step_terms, step))
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        drained = flags.drain()
        assert outcomes[:lag] == [(False, None)] * lag  # nothing reported before step 1's flags are read
        reported = outcomes[lag:]  # push n reports step n - lag
        assert reported[0] == (False, None)  # step 1: finite, no stop
        stop, (bad_terms, bad_step) = reported[1]  # step 2: the NaN, with the terms it had
        assert not stop and bad_step == 2 and torch.isnan(bad_terms["loss"]) and float(bad_terms["cls"]) == 2.0
        if lag == 1:
            assert reported[2] == (True, None)  # step 3: the stop signal
            assert drained == (False, None)  # step 4
        else:
            assert drained == (True, None)  # steps 3 (the stop signal) and 4
        assert flags.drain() == (False, None)
    finally:
        dist.destroy_process_group()


def test_momentum_saved_contiguous_resumes_in_the_channels_last_weights_layout():
    """A checkpoint from a run whose weights were contiguous: its momentum must pair with the same
    elements of a channels_last weight, or the fused SGD step (flat memory) silently goes wrong."""
    from pipeline.trainer import state_in_parameter_layout

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 4, 3, 3).contiguous(memory_format=torch.channels_last))
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, fused=True)
    momentum = torch.randn(8, 4, 3, 3)  # as a contiguous run saved it
    optimizer.state[weight]["momentum_buffer"] = momentum.clone()
    start, grad = weight.detach().clone(), torch.randn(8, 4, 3, 3)
    state_in_parameter_layout(optimizer)
    assert optimizer.state[weight]["momentum_buffer"].is_contiguous(memory_format=torch.channels_last)
    weight.grad = grad.contiguous(memory_format=torch.channels_last)
    optimizer.step()
    torch.testing.assert_close(weight.detach(), start - 0.1 * (0.9 * momentum + grad))


def test_stage_eta_is_the_pace_of_this_process_times_the_steps_left():
    # 10 steps in 20 s: 2 s a step, 30 of the stage's 40 steps left
    assert stage_eta(10, 0, 20.0, 40) == "01:00"
    # resumed at step 25: only the 5 steps run here (10 s) set the pace, 10 steps left
    assert stage_eta(30, 25, 10.0, 40) == "00:20"
    assert stage_eta(20, 0, 3600.0, 40) == "1:00:00"
    assert stage_eta(40, 25, 30.0, 40) == "00:00"  # the stage's last step
    assert stage_eta(25, 25, 5.0, 40) == "?"  # nothing run here yet (just resumed)


def test_train_step_is_the_plain_step_and_stops_at_a_non_finite_loss_before_its_backward(tmp_path):
    """TrainStep on a plain module: the weights of a hand-written forward, backward, SGD and
    scheduler steps and zero_grad, bit for bit; with flags, a non-finite loss raises before the
    backward of the step that reads it, so that step changes no weight."""
    import copy
    import types

    import torch.distributed as dist
    import torch.nn.functional as F

    from pipeline.step import StepFlags, TrainStep

    class Net(torch.nn.Module):  # a module that returns (logits, gates) as RDI-Net does, small
        def __init__(self):
            super().__init__()
            self.conv, self.norm, self.fc = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 10)

        def forward(self, images):
            features = self.norm(self.conv(images)).relu().mean((2, 3))
            return types.SimpleNamespace(logits=self.fc(features), gates=features.sigmoid())

    def loss_terms(images, logits, gates, labels):
        return {"loss": F.cross_entropy(logits.float(), labels)}

    torch.manual_seed(0)
    model = Net()
    reference = copy.deepcopy(model)
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    optimizer, ref_optimizer = sgd(model), sgd(reference)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(ref_optimizer, step_size=1, gamma=0.5)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(3)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        bad = []
        step = TrainStep(model, optimizer, loss_terms, scheduler=scheduler, flags=StepFlags(torch.device("cpu")),
                         stop_requested=lambda: True, on_non_finite=lambda terms, n: bad.append(n))
        for n, (images, labels) in enumerate(batches, start=1):
            terms, gates, stop = step(images, labels, n)
            assert stop == (n > 1)  # the flags read a step late
            loss_terms(images, reference(images).logits, None, labels)["loss"].backward()
            ref_optimizer.step()
            ref_scheduler.step()
            ref_optimizer.zero_grad(set_to_none=True)
        assert float(terms["loss"].detach()) > 0 and gates is not None
        for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
            assert torch.equal(a, b), name
        assert bad == [] and all(p.grad is None for p in model.parameters())

        with torch.no_grad():
            model.fc.weight.fill_(float("nan"))
        step = TrainStep(model, optimizer, loss_terms, flags=StepFlags(torch.device("cpu")))
        step(*batches[0], 4)  # a NaN loss, reported by the next step's flags
        params = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(FloatingPointError, match="non-finite loss at step 4"):
            step(*batches[1], 5)
        for p, before in zip(model.parameters(), params):  # step 5 stopped before its backward
            torch.testing.assert_close(p.detach(), before, rtol=0, atol=0, equal_nan=True)
    finally:
        dist.destroy_process_group()

