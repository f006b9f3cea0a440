"""The frozen network (rdinet.inference) and its kernels (rdinet.kernels) against direct references:
the row kernels against x[index] @ W^T + b, the frozen net against the model's own eval forward,
the Triton histograms against the torch ones. On the CPU the Triton kernels run in its interpreter."""

import pytest
import torch

from rdinet import create_model, inference, kernels, srm

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_triton = pytest.mark.skipif(kernels.triton is None or not (CUDA or kernels.INTERPRETING),
                                  reason="needs triton on a GPU or in its interpreter (TRITON_INTERPRET=1)")
BACKENDS = [False, pytest.param(True, marks=needs_triton)]


def reference_rows(x_rows, weight_t, bias, index, per_sample):
    """(rows of the samples in index) @ weight_t + bias, computed directly in float64."""
    picked = torch.cat([x_rows[i * per_sample:(i + 1) * per_sample] for i in index.tolist()])
    return picked.double() @ weight_t.double() + bias.double()


@pytest.mark.parametrize("use_triton", BACKENDS)
@pytest.mark.parametrize("k,n", [(64, 48), (40, 24)])  # K a multiple of the tile, and not
def test_gather_linear_reads_only_the_indexed_samples(use_triton, k, n):
    torch.manual_seed(0)
    per_sample, batch = 6, 7
    x = torch.randn(batch * per_sample, k, device=DEVICE)
    weight_t, bias = torch.randn(k, n, device=DEVICE), torch.randn(n, device=DEVICE)
    index = torch.tensor([5, 0, 3, 3], device=DEVICE)  # any order; repeats (bucket padding) allowed
    out = kernels.gather_linear(x, weight_t, bias, index, per_sample, relu=True, use_triton=use_triton)
    expected = reference_rows(x, weight_t, bias, index, per_sample).relu()
    torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3)
    dense = kernels.gather_linear(x, weight_t, bias, None, per_sample, relu=False, use_triton=use_triton)
    torch.testing.assert_close(dense.double(), x.double() @ weight_t.double() + bias.double(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("use_triton", BACKENDS)
def test_linear_scatter_writes_only_the_indexed_samples(use_triton):
    torch.manual_seed(1)
    per_sample, batch, k, n = 5, 6, 32, 40
    index = torch.tensor([4, 1, 2], device=DEVICE)
    y = torch.randn(4 * per_sample, k, device=DEVICE)  # one extra (padding) sample, ignored
    weight_t, bias = torch.randn(k, n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = torch.randn(batch * per_sample, n, device=DEVICE)
    before = out.clone()
    kernels.linear_scatter_(y, weight_t, bias, out, index, per_sample, use_triton=use_triton)
    for row, sample in enumerate(index.tolist()):
        rows = slice(sample * per_sample, (sample + 1) * per_sample)
        mine = slice(row * per_sample, (row + 1) * per_sample)
        expected = (y[mine].double() @ weight_t.double() + bias.double() + before[rows].double()).relu()
        torch.testing.assert_close(out[rows].double(), expected, rtol=1e-3, atol=1e-3)
    untouched = [s for s in range(batch) if s not in index.tolist()]
    for sample in untouched:  # bit for bit: never read into the product, never written
        rows = slice(sample * per_sample, (sample + 1) * per_sample)
        assert torch.equal(out[rows], before[rows])
    empty = out.clone()
    kernels.linear_scatter_(y, weight_t, bias, empty, index[:0], per_sample, use_triton=use_triton)
    assert torch.equal(empty, out)


def randomised_bn(model):
    """Eval statistics far from the initial ones, so that folding them is really tested."""
    torch.manual_seed(2)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):  # the routers' too
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.3, 0.3)
    return model


@pytest.fixture
def exact_fp32():
    """float32 convolutions and matmuls on a GPU: TF32 (cuDNN's default there) rounds the folded
    and the unfolded arithmetic differently, by more than the margins' tolerance."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def eval_forward(model, x, seed):
    model.executor = "masked"
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


# the Triton case runs ResNet-50 through its CPU interpreter here: 3-8 s each, so slow
@pytest.mark.parametrize("use_triton,arch,size", [(False, "resnet50", 32), (False, "resnet20", 16),
                                                   pytest.param(True, "resnet50", 32, marks=[needs_triton, pytest.mark.slow])])
@pytest.mark.parametrize("mode,router_norm", [("full", "none"), ("uniform", "none"), ("joint", "none"),
                                              ("joint", "batch")])
def test_frozen_net_equals_the_model(use_triton, arch, size, mode, router_norm, exact_fp32):  # (BasicBlocks use no row kernels)
    model = create_model(arch, num_classes=10, d=16, router_norm=router_norm)
    model = randomised_bn(model).to(DEVICE).eval().set_mode(mode)
    model.uniform_rate = 0.6
    x = torch.randn(6, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
    expected = eval_forward(model, x, seed=3)
    frozen = inference.freeze(model, dtype=torch.float32, bucket=4, use_triton=use_triton)
    torch.manual_seed(3)  # "uniform" draws its decisions as the model does
    out = frozen(x)
    assert torch.equal(out.gates, expected.gates)
    if mode == "joint":  # the routers' margins, their BatchNorm's running statistics included
        torch.testing.assert_close(out.margins, expected.margins, rtol=1e-3, atol=1e-4)
    else:
        assert out.margins is None
    if mode != "full":
        assert 0 < out.gates.mean() < 1, "some blocks must be skipped by some samples"
    tol = 2e-3 if CUDA else 1e-4  # TF32 products on a GPU
    torch.testing.assert_close(out.logits, expected.logits, rtol=tol, atol=tol * expected.logits.abs().max())


@pytest.mark.parametrize("bucket", [1, 3, 8])
def test_given_decisions_and_buckets_do_not_change_the_result(bucket):
    model = randomised_bn(create_model("resnet50", num_classes=10, d=16)).to(DEVICE).eval().set_mode("uniform")
    x = torch.randn(5, 3, 32, 32, device=DEVICE)
    gates = (torch.rand(5, model.num_blocks, device=DEVICE) < 0.5).float()
    gates[:, 1] = 0  # a block nobody runs
    gates[:, 2] = 1  # and one everybody runs
    model.executor = "masked"
    with torch.no_grad():
        expected = _forced(model, x, gates)
    out = inference.freeze(model, dtype=torch.float32, bucket=bucket)(x, gates=gates)
    assert torch.equal(out.gates, gates)
    tol = 2e-3 if CUDA else 1e-4
    torch.testing.assert_close(out.logits, expected, rtol=tol, atol=tol * expected.abs().max())


def _forced(model, x, gates):
    """The model's masked forward with the given decisions, block by block (eq. 1)."""
    from rdinet.executor import run_masked
    h = model.stem(x)
    for n, block in enumerate(model.blocks):
        h = run_masked(block, h, gates[:, n])
    return model.fc(torch.flatten(model.avgpool(h), 1))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_frozen_net_in_bf16_on_the_gpu():
    model = randomised_bn(create_model("resnet50", num_classes=100)).cuda().eval().set_mode("uniform")
    x = torch.randn(64, 3, 96, 96, device="cuda").contiguous(memory_format=torch.channels_last)
    expected = eval_forward(model, x, seed=4)
    torch.manual_seed(4)
    out = inference.freeze(model, bucket=8)(x)  # bf16, Triton
    assert torch.equal(out.gates, expected.gates)
    error = (out.logits - expected.logits).norm() / expected.logits.norm()
    assert error < 3e-2, f"relative error {error:.2e} of the bf16 frozen net"


def test_bad_input_is_refused():
    model = create_model("resnet20", d=8)
    with pytest.raises(ValueError, match="needs an RDINet"):
        inference.freeze(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="bucket=0"):
        inference.freeze(model, bucket=0)
    frozen = inference.freeze(model.set_mode("uniform"))
    with pytest.raises(ValueError, match=r"gates must be a \(2, 9\) tensor"):
        frozen(torch.randn(2, 3, 16, 16), gates=torch.ones(2, 8))
    if not kernels.INTERPRETING and not CUDA:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kernels.gather_linear(torch.randn(4, 8), torch.randn(8, 8), torch.randn(8), None, 2, True, use_triton=True)


@needs_triton
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("bins", [16, 10])
def test_triton_histograms_equal_the_torch_ones(memory_format, bins):
    torch.manual_seed(5)
    images = torch.randint(0, 256, (4, 3, 13, 21), dtype=torch.uint8, device=DEVICE)
    images = images.contiguous(memory_format=memory_format)
    torch.testing.assert_close(kernels.channel_histograms(images, bins), _torch_histograms(images, bins),
                               rtol=0, atol=0)
    normalised = torch.randn(4, 3, 13, 21, device=DEVICE).contiguous(memory_format=memory_format)
    mean, std = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)
    mean_t, std_t = (torch.tensor(v, device=DEVICE) for v in (mean, std))
    got = kernels.channel_histograms(normalised, bins, mean_t, std_t)
    torch.testing.assert_close(srm.color_histograms(normalised, bins, mean, std, use_triton=True), got)
    # A value within rounding of a bin edge may land on either side of it: at most one pixel per channel.
    torch.testing.assert_close(got, _torch_histograms(normalised, bins, mean, std), rtol=0, atol=1.01 / (13 * 21))
    assert torch.allclose(got.view(4, 3, bins).sum(-1), torch.ones(4, 3, device=DEVICE))


def _torch_histograms(images, bins, mean=None, std=None):
    """srm.color_histograms with its torch path (the one it takes on the CPU and under torch.compile)."""
    return srm.color_histograms(images, bins, mean, std, use_triton=False)


def blend_reference(residual, shortcut, gate):
    """Eqs. 1 and 9 as the model wrote them before the kernel: lerp(s, ReLU(r + s), v)."""
    out = torch.relu(residual + shortcut)
    return torch.lerp(shortcut, out, gate.view(-1, 1, 1, 1).to(out.dtype))


def blend_inputs(shape, memory_format, seed):
    """(residual, shortcut, gate) in float64 for the reference, and the same in float32 for the kernel."""
    torch.manual_seed(seed)
    make = lambda: torch.randn(*shape, device=DEVICE, dtype=torch.float64).contiguous(  # noqa: E731
        memory_format=memory_format).requires_grad_()
    reference = (make(), make(), torch.rand(shape[0], device=DEVICE, dtype=torch.float64, requires_grad=True))
    inputs = tuple(t.detach().float().requires_grad_() for t in reference)  # .float() keeps the memory format
    return reference, inputs


def assert_grads_close(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 64, 2, 2)])  # a sample over several programs, and in one
def test_blend_kernel_and_its_backward_equal_autograd(memory_format, shape):
    reference, inputs = blend_inputs(shape, memory_format, seed=6)
    grad = torch.randn(*shape, device=DEVICE, dtype=torch.float64)
    expected = blend_reference(*reference)
    expected_grads = torch.autograd.grad(expected, reference, grad)
    assert kernels.blend_fits(*inputs)
    out = kernels.blend(*inputs)
    assert out.stride() == inputs[0].stride()
    grads = torch.autograd.grad(out, inputs, grad.float().contiguous())  # another layout than the inputs
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert_grads_close(grads, expected_grads)


@needs_triton
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 300, 3, 3), (2, 8, 40, 40)])  # odd sizes; channel blocks; many pixels
def test_blend_with_mean_and_its_backward_equal_autograd(memory_format, shape):
    """The blend's GAP output (the next router's input) and the gradients through both outputs."""
    reference, inputs = blend_inputs(shape, memory_format, seed=9)
    grad = torch.randn(*shape, device=DEVICE, dtype=torch.float64)
    grad_mean = torch.randn(shape[:2], device=DEVICE, dtype=torch.float64)
    expected = blend_reference(*reference)
    expected_mean = expected.sum(dim=(2, 3)) / (shape[2] * shape[3])
    out, mean = kernels.blend(*inputs, with_mean=True)
    assert mean.shape == shape[:2] and mean.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-5, atol=1e-5)
    both = dict(retain_graph=True)
    assert_grads_close(torch.autograd.grad((out, mean), inputs, (grad.float(), grad_mean.float()), **both),
                       torch.autograd.grad((expected, expected_mean), reference, (grad, grad_mean), **both))
    # only the mean used: no gradient reaches out, the mean's alone flows
    assert_grads_close(torch.autograd.grad(mean, inputs, grad_mean.float()),
                       torch.autograd.grad(expected_mean, reference, grad_mean))


@needs_triton
def test_blend_reads_the_gate_in_place_and_sums_bf16_in_float32():
    """The gate as the model passes it, a column of the Gumbel softmax's (B, 2) output (stride 2,
    no copy): values and gradients as with the torch formula; with bf16 activations the mean the
    next router reads comes out in float32."""
    torch.manual_seed(4)
    shape = (3, 5, 4, 4)
    make = lambda: torch.randn(*shape, device=DEVICE).contiguous(  # noqa: E731
        memory_format=torch.channels_last).requires_grad_()
    residual, shortcut = make(), make()
    pair = torch.rand(shape[0], 2, device=DEVICE, requires_grad=True)
    assert pair[:, 1].stride() == (2,)
    out, mean = kernels.blend(residual, shortcut, pair[:, 1], with_mean=True)
    expected = blend_reference(residual, shortcut, pair[:, 1])
    weights = torch.randn(*shape, device=DEVICE)
    grads = torch.autograd.grad((out * weights).sum() + mean.square().sum(), (residual, shortcut, pair))
    expected_grads = torch.autograd.grad((expected * weights).sum() + expected.mean(dim=(2, 3)).square().sum(),
                                         (residual, shortcut, pair))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, expected.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert grads[2][:, 0].abs().max() == 0  # the skip column takes no gradient
    residual16, shortcut16, gate = residual.detach().bfloat16(), shortcut.detach().bfloat16(), pair[:, 1].detach()
    out16, mean16 = kernels.blend(residual16, shortcut16, gate, with_mean=True)
    assert out16.dtype == torch.bfloat16 and mean16.dtype == torch.float32
    # summed before out is rounded to bf16: the float32 blend of the same bf16 inputs
    unrounded = blend_reference(residual16.float(), shortcut16.float(), gate)
    torch.testing.assert_close(mean16, unrounded.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_router_mean_gradient_equals_autograds():
    torch.manual_seed(7)
    from rdinet.routers import channel_mean
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    weights = torch.randn(3, 4, dtype=torch.float64)
    (grad,) = torch.autograd.grad((channel_mean(x) * weights).sum() + (x ** 2).sum(), x)
    (expected,) = torch.autograd.grad((x.mean(dim=(2, 3)) * weights).sum() + (x ** 2).sum(), x)
    torch.testing.assert_close(grad, expected)
    assert torch.autograd.gradcheck(channel_mean, (x,))


@needs_triton
@pytest.mark.slow  # a training step through Triton's CPU interpreter: 6-7 s
@pytest.mark.parametrize("mode", ["joint", "uniform"])
def test_training_step_with_the_kernels_equals_the_torch_ops(mode, monkeypatch):
    """The joint/USW forward and backward with the Triton blend (run_masked takes it on a GPU; on
    the CPU it is made to, in the interpreter), the routers' GAP it sums and the expanded GAP
    gradient of the first router, against the same model run with torch ops only; full float32
    (TF32 would amplify the blend's rounding)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # matmuls are full float32 by default
    if not CUDA:
        monkeypatch.setattr(kernels, "triton_runs_on", lambda t: True)
    batch, size = (8, 64) if CUDA else (4, 32)

    def step():
        torch.manual_seed(8)
        model = create_model("resnet50", num_classes=10, d=32).to(DEVICE, memory_format=torch.channels_last)
        model.train().set_mode(mode)
        x = torch.randn(batch, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
        out = model(x)
        (out.logits.square().mean() + out.gates.mean()).backward()
        return out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    out, grads = step()
    monkeypatch.setattr(kernels, "triton_runs_on", lambda t: False)
    from rdinet import routers
    monkeypatch.setattr(routers, "channel_mean", lambda x: x.mean(dim=(2, 3)))
    ref, ref_grads = step()
    assert grads.keys() == ref_grads.keys()
    # The kernel rounds once where lerp rounds twice; training-mode BatchNorm over few values
    # amplifies that through the network (6.7e-4 relative on the CPU at this size). A wrong
    # term or a missing gradient would be off by order 1.
    for part in ("stem", "blocks", "routers", "fc") if mode == "joint" else ("stem", "blocks", "fc"):
        got, want = (torch.cat([g.flatten() for n, g in d.items() if n.startswith(part)]) for d in (grads, ref_grads))
        assert (got - want).norm() / want.norm() < 1e-2, part
    assert (out.logits - ref.logits).norm() / ref.logits.norm() < 1e-3
