"""The dynamic network: modes, executors, gradients, precision, parameter layout, bad input."""

import subprocess
import sys

import pytest
import torch
import torchvision

from rdinet import ARCHS, RDIOutput, create_model, load_torchvision_weights
from rdinet.executor import run_masked, run_selected
from rdinet.losses import total_loss
from rdinet.srm import color_histograms

CHANNELS_LAST = torch.channels_last


def small_model(arch="resnet20", **kwargs):
    torch.manual_seed(0)
    return create_model(arch, d=kwargs.pop("d", 16), **kwargs)


def test_block_counts_and_layout():
    expected = {"resnet20": 9, "resnet32": 15, "resnet56": 27, "resnet110": 54, "resnet50": 16, "resnet101": 33}
    assert set(ARCHS) == set(expected)
    for arch, blocks in expected.items():
        model = create_model(arch, d=8)
        assert model.num_blocks == blocks == len(model.routers) == len(model.blocks)
        assert model.arch == arch and model.mode == "joint"
    model = small_model()
    keys = model.state_dict().keys()
    router_keys = {k for k in keys if k.startswith("routers.")}
    assert router_keys and all(k.split(".")[0] in ("stem", "blocks", "routers", "fc") for k in keys)
    router_ids = {id(p) for p in model.router_parameters()}
    block_ids = {id(p) for p in model.block_parameters()}
    assert router_ids.isdisjoint(block_ids)
    assert router_ids | block_ids == {id(p) for p in model.parameters()}
    assert router_ids == {id(p) for n, p in model.named_parameters() if n.startswith("routers.")}


def test_shape_changing_blocks_have_projection_shortcuts():
    for arch in ARCHS:
        model = create_model(arch, d=8)
        for block in model.blocks:
            out_channels = block.bn2.num_features * block.expansion if hasattr(block, "bn3") else block.bn2.num_features
            changes_shape = block.conv1.in_channels != out_channels or block.conv2.stride != (1, 1)
            assert (block.downsample is not None) == changes_shape
            if changes_shape:
                conv, bn = block.downsample
                assert conv.kernel_size == (1, 1) and isinstance(bn, torch.nn.BatchNorm2d)


def test_modes_and_gate_values():
    model = small_model()
    x = torch.randn(6, 3, 8, 8)
    out = model.train()(x)
    assert isinstance(out, RDIOutput) and out.logits.shape == (6, 10) and out.gates.shape == (6, 9)
    assert ((out.gates > 0) & (out.gates < 1)).all()
    with torch.no_grad():
        hard = model.eval()(x).gates
        assert set(hard.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(model(x).gates, hard)  # no noise at inference
        assert torch.equal(model.set_mode("full")(x).gates, torch.ones(6, 9))
        uniform = model.set_mode("uniform")(x).gates
        assert set(uniform.unique().tolist()) == {0.0, 1.0}
    uniform_train = model.train()(x).gates
    assert set(uniform_train.unique().tolist()) == {0.0, 1.0}


def test_full_mode_equals_torchvision_resnet50_with_loaded_weights():
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(weights=None).eval()
    for m in reference.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    model = create_model("resnet50", d=8)
    report = load_torchvision_weights(model, reference.state_dict())
    assert not report.missing and not report.unexpected and not report.skipped
    model.set_mode("full").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x), rtol=1e-4, atol=1e-4)


def test_load_torchvision_weights_reports_and_refuses(tmp_path):
    state = torchvision.models.resnet50(weights=None, num_classes=1000).state_dict()
    model = create_model("resnet50", num_classes=10, d=8)
    before = model.routers.state_dict()
    report = load_torchvision_weights(model, state)
    assert any(s.startswith("fc.weight") for s in report.skipped) and not report.missing
    assert all(torch.equal(v, model.routers.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(model.blocks[3].conv2.weight, state["layer2.0.conv2.weight"])
    torch.testing.assert_close(model.stem.bn1.running_var, state["bn1.running_var"])

    path = tmp_path / "r50.pth"
    torch.save(state, path)
    assert load_torchvision_weights(create_model("resnet50", d=8), path).loaded
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "r50.safetensors"))
    assert load_torchvision_weights(create_model("resnet50", d=8), tmp_path / "r50.safetensors").loaded

    r101 = torchvision.models.resnet101(weights=None).state_dict()
    with pytest.raises(ValueError, match="unexpected: layer3.6"):
        load_torchvision_weights(create_model("resnet50", d=8), r101)
    partial = load_torchvision_weights(create_model("resnet50", d=8), r101, strict=False)
    assert partial.unexpected and not partial.missing
    with pytest.raises(ValueError, match="missing: blocks.13"):
        load_torchvision_weights(create_model("resnet101", d=8), state)
    with pytest.raises(ValueError, match="resnet50 or resnet101"):
        load_torchvision_weights(create_model("resnet20", d=8), state)
    with pytest.raises(ValueError, match="not a file"):
        load_torchvision_weights(model, tmp_path / "absent.pth")


def forced_logits(model, x, executor, seed=7):
    model.executor = executor
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("arch,size", [("resnet20", 16), ("resnet50", 32)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CHANNELS_LAST])
def test_skip_executor_equals_masked_for_random_decisions(arch, size, memory_format):
    model = small_model(arch).set_mode("uniform").eval()
    x = torch.randn(8, 3, size, size).contiguous(memory_format=memory_format)
    skip, masked = forced_logits(model, x, "skip"), forced_logits(model, x, "masked")
    torch.testing.assert_close(skip.gates, masked.gates)
    assert 0 < skip.gates.mean() < 1
    torch.testing.assert_close(skip.logits, masked.logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bucket", [3, 8, 32])
def test_bucketed_skip_equals_masked(bucket):
    """Rounding the executed count up (repeating a sample) must not change any output."""
    model = small_model("resnet20").set_mode("uniform").eval()
    model.uniform_rate = 0.4
    x = torch.randn(10, 3, 16, 16).contiguous(memory_format=CHANNELS_LAST)
    masked = forced_logits(model, x, "masked")
    model.skip_bucket = bucket
    skip = forced_logits(model, x, "skip")
    torch.testing.assert_close(skip.gates, masked.gates)
    torch.testing.assert_close(skip.logits, masked.logits, rtol=1e-4, atol=1e-5)


def test_skip_executor_equals_masked_for_router_decisions():
    model = small_model().eval()
    x = torch.randn(8, 3, 16, 16)
    skip, masked = forced_logits(model, x, "skip"), forced_logits(model, x, "masked")
    torch.testing.assert_close(skip.gates, masked.gates)
    torch.testing.assert_close(skip.logits, masked.logits, rtol=1e-4, atol=1e-5)


def test_skip_executor_with_autograd_on_in_eval():
    """Eval with gradients (e.g. saliency): the skip executor must not overwrite saved tensors."""
    model = small_model().set_mode("uniform").eval()
    x = torch.randn(6, 3, 8, 8, requires_grad=True)
    with_grad = forced_logits_grad(model, x)
    with_grad.logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(with_grad.logits.detach(), forced_logits(model, x.detach(), "skip").logits)


def forced_logits_grad(model, x, seed=7):
    model.executor = "skip"
    torch.manual_seed(seed)
    return model(x)


def test_run_selected_keeps_memory_format_and_skips_empty_blocks():
    model = small_model().eval()
    calls = []
    for index in (0, 3):  # an identity block and a projection block
        block = model.blocks[index]
        handle = block.conv1.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        x = torch.randn(6, block.conv1.in_channels, 8, 8).contiguous(memory_format=CHANNELS_LAST)
        with torch.no_grad():
            for gate in (torch.tensor([1., 0, 0, 1, 1, 0]), torch.zeros(6), torch.ones(6)):
                calls.clear()
                before = x.clone()
                out = run_selected(block, x, gate)
                assert calls == ([int(gate.sum())] if gate.any() else [])  # only executing samples
                assert torch.equal(x, before), "inplace=False must leave the input alone"
                assert out.is_contiguous(memory_format=CHANNELS_LAST)
                torch.testing.assert_close(out, run_masked(block, x, gate), rtol=1e-5, atol=1e-6)
                in_place = run_selected(block, x.clone(), gate, inplace=True)
                assert in_place.is_contiguous(memory_format=CHANNELS_LAST)
                torch.testing.assert_close(in_place, out)
        handle.remove()


def test_uniform_sampling_visits_paths_with_probability_half():
    model = small_model().set_mode("uniform").eval()
    torch.manual_seed(11)
    with torch.no_grad():
        gates = model(torch.randn(4096, 3, 4, 4)).gates
    assert abs(gates.mean().item() - 0.5) < 0.01
    assert ((gates.mean(dim=0) - 0.5).abs() < 0.04).all()
    # Every path over two blocks equally likely (independent decisions).
    for a, b in ((0, 1), (3, 8)):
        for ua in (0, 1):
            for ub in (0, 1):
                share = ((gates[:, a] == ua) & (gates[:, b] == ub)).float().mean().item()
                assert abs(share - 0.25) < 0.03
    torch.manual_seed(11)
    with torch.no_grad():
        assert torch.equal(model(torch.randn(4096, 3, 4, 4)).gates, gates)  # torch's RNG


def router_grads(model):
    return [(None if p.grad is None else p.grad.abs().sum().item()) for p in model.router_parameters()]


def test_gradients_reach_every_router_in_joint_mode_only():
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for gamma in (0.5, 0.0, "auto"):
        model = small_model(gamma=gamma).train()
        out = model(x)
        hist = color_histograms((x * 50 + 128).clamp(0, 255), mean=(0, 0, 0), std=(1, 1, 1))
        total_loss(out.logits, y, out.gates, hist, t=0.5, alpha=0.2)["loss"].backward()
        grads = router_grads(model)
        assert all(g is not None and g > 0 for g in grads), gamma
    for mode in ("uniform", "full"):
        model = small_model().set_mode(mode).train()
        out = model(x)
        torch.nn.functional.cross_entropy(out.logits, y).backward()
        assert all(g is None for g in router_grads(model))
        assert all(p.grad is not None for p in model.block_parameters())


def test_straight_through_gives_hard_gates_with_gradients():
    model = small_model(straight_through=True).train()
    out = model(torch.randn(8, 3, 8, 8))
    assert set(out.gates.unique().tolist()) <= {0.0, 1.0}
    assert out.gates.requires_grad
    (out.logits.sum() + out.gates.sum()).backward()
    assert all(g is not None and g > 0 for g in router_grads(model))


def router_logits(model, images):
    """Each router's logits along the model's eval forward (hard decisions), recomputed by hand."""
    with torch.no_grad():
        x, features, logits_per_block = model.stem(images), [], []
        for n, block in enumerate(model.blocks):
            s_n, logits = model.routers[n](x, list(features))
            features = (features + [s_n])[-model.r:]
            logits_per_block.append(logits)
            u = (logits[:, 1] > logits[:, 0]).float().view(-1, 1, 1, 1)
            x = u * block(x) + (1 - u) * block.shortcut(x)
    return torch.stack(logits_per_block, dim=1)  # (B, N, 2)


@pytest.mark.parametrize("router_norm", ["none", "batch"])
def test_margins_are_the_routers_logit_differences_and_the_eval_rules(router_norm):
    """out.margins = logit_execute - logit_skip; the hard eval rule executes iff margin > 0, the
    soft diagnostic rule blends with softmax(logits / tau)[execute] = sigmoid(margin / tau)."""
    model = small_model(router_norm=router_norm, tau=0.8).eval()
    images = torch.randn(6, 3, 8, 8)
    logits = router_logits(model, images)
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(out.margins, logits[..., 1] - logits[..., 0])
        assert torch.equal(out.gates, (out.margins > 0).float())
        model.eval_gates = "soft"
        soft = model(images)
        model.eval_gates = "hard"
    # block 1's router sees the stem's output under either rule
    torch.testing.assert_close(soft.gates[:, 0], torch.sigmoid(out.margins[:, 0] / 0.8))
    torch.testing.assert_close(soft.gates, torch.sigmoid(soft.margins / 0.8))
    assert ((soft.gates > 0) & (soft.gates < 1)).all()
    assert model.set_mode("full")(images).margins is None
    with pytest.raises(ValueError, match="eval_gates='noisy'"):
        model.eval_gates = "noisy"


def test_eval_rule_is_batch_independent_with_router_batch_norm():
    """The routers' BatchNorm uses its running statistics in eval: an image's decisions do not
    depend on the images it is batched with."""
    model = small_model(router_norm="batch").train()
    for _ in range(3):  # non-trivial running statistics
        model(torch.randn(16, 3, 8, 8))
    model.eval()
    images = torch.randn(10, 3, 8, 8)
    with torch.no_grad():
        whole = model(images)
        parts = [model(images[i:i + 3]) for i in range(0, 10, 3)]
    torch.testing.assert_close(torch.cat([p.margins for p in parts]), whole.margins, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.cat([p.gates for p in parts]), whole.gates)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, CHANNELS_LAST])
def test_bf16_autocast_on_cpu(memory_format):
    model = small_model().train()
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=memory_format)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.logits.float().sum().backward()
    assert out.gates.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype in (torch.float32, torch.int64) for b in model.buffers())
    model.eval().set_mode("uniform")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        skip, masked = forced_logits(model, x, "skip"), forced_logits(model, x, "masked")
    torch.testing.assert_close(skip.logits.float(), masked.logits.float(), rtol=2e-2, atol=2e-2)


def test_model_cast_to_bf16_runs_in_bf16():
    """DeepSpeed's bf16 mode casts the whole model; the gates must not promote features to fp32."""
    model = small_model().to(torch.bfloat16).train()
    out = model(torch.randn(4, 3, 8, 8, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16
    out.logits.float().sum().backward()


@pytest.mark.parametrize("kwargs,match", [
    (dict(arch="resnet18"), "arch='resnet18'.*accepted values"),
    (dict(gamma=1.5), "gamma=1.5"),
    (dict(gamma=-0.1), "gamma=-0.1"),
    (dict(gamma="learned"), "gamma='learned'.*auto"),
    (dict(gamma=True), "gamma=True"),
    (dict(r=-1), "r=-1"),
    (dict(r=1.5), "r=1.5"),
    (dict(d=0), "d=0"),
    (dict(tau=0), "tau=0"),
    (dict(tau=-1.0), "tau=-1.0"),
    (dict(executor="fast"), "executor='fast'.*skip.*masked"),
    (dict(num_classes=0), "num_classes=0"),
])
def test_bad_model_arguments(kwargs, match):
    arch = kwargs.pop("arch", "resnet20")
    with pytest.raises(ValueError, match=match):
        create_model(arch, **kwargs)


def test_bad_mode_executor_and_images():
    model = small_model()
    with pytest.raises(ValueError, match="mode='sample'.*joint.*uniform.*full"):
        model.set_mode("sample")
    with pytest.raises(ValueError, match="executor='gather'"):
        model.executor = "gather"
    with pytest.raises(ValueError, match="tau"):
        model.tau = 0.0
    with pytest.raises(ValueError, match="rank 4"):
        model(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="3 channels"):
        model(torch.randn(2, 1, 8, 8))
    for dtype in (torch.uint8, torch.int64):
        with pytest.raises(ValueError, match="floating-point.*float32"):
            model(torch.zeros(2, 3, 8, 8, dtype=dtype))


def test_import_loads_no_training_stack():
    code = ("import rdinet, sys; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('deepspeed', 'accelerate', 'nvidia')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
