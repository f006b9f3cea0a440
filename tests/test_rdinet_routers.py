"""Relational routers (eqs. 3-8) against loop-based reference computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from rdinet import create_model
from rdinet.routers import RelationalRouter, relation_matrix, relation_weights


def eq4_as_printed(rows, gamma):
    """A_{m,n} = gamma^(n-m) for n >= m, else 0 (eq. 4 as printed in the paper)."""
    return [[gamma ** (n - m) if n >= m else 0.0 for n in range(rows)] for m in range(rows)]


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_relation_matrix_is_transpose_of_eq4(rows, gamma):
    printed = eq4_as_printed(rows, gamma)
    ours = relation_matrix(rows, gamma)
    for m in range(rows):
        for n in range(rows):
            assert ours[m, n].item() == pytest.approx(printed[n][m])
    # The current node (last row) receives gamma^k from the node k steps back, and 1 from itself.
    expected_last = [gamma ** (rows - 1 - k) for k in range(rows)]
    assert relation_weights(rows, gamma).tolist() == pytest.approx(expected_last)


def batch_norm_stats(router, pre, which):
    """(mean, var) per feature that the router's BatchNorm `which` normalises `pre` (B rows of d
    values) with: the batch's own (biased variance) in training, the running ones in eval."""
    bn = getattr(router, which)
    if not bn.training:
        return bn.running_mean.tolist(), bn.running_var.tolist()
    columns = list(zip(*pre))
    means = [sum(c) / len(c) for c in columns]
    return means, [sum((v - m) ** 2 for v in c) / len(c) for c, m in zip(columns, means)]


def normalised(router, pre, which):
    """pre (B rows of d values) through the router's BatchNorm `which`, or unchanged without one."""
    if router.norm == "none":
        return pre
    bn = getattr(router, which)
    means, variances = batch_norm_stats(router, pre, which)
    w, b = bn.weight.tolist(), bn.bias.tolist()
    return [[(v - means[j]) / math.sqrt(variances[j] + bn.eps) * w[j] + b[j] for j, v in enumerate(row)]
            for row in pre]


def reference_router(router, x, previous, gamma, r):
    """Eqs. 5-8 with python loops over samples, channels and graph nodes; returns (s_n, logits).
    With router.norm == "batch", a BatchNorm before each ReLU (computed over the batch)."""
    w0, b0 = router.align.weight.tolist(), router.align.bias.tolist()
    w1 = router.gcn.weight.tolist()  # nn.Linear stores W^T: out[j] = sum_i in[i] * weight[j][i]
    w2, b2 = router.decide.weight.tolist(), router.decide.bias.tolist()
    batch, channels, height, width = x.shape
    d = len(b0)
    aligned = []
    for b in range(batch):
        s_hat = [sum(x[b, c, h, w].item() for h in range(height) for w in range(width)) / (height * width)
                 for c in range(channels)]
        aligned.append([sum(w0[j][c] * s_hat[c] for c in range(channels)) + b0[j] for j in range(d)])
    aligned = normalised(router, aligned, "align_norm")
    s_out, logits_out, pre_gcn = [], [], []
    for b in range(batch):
        s_tilde = [max(0.0, v) for v in aligned[b]]
        preceding = [p[b].tolist() for p in previous[max(0, len(previous) - r):]] if r else []
        stacked = preceding + [s_tilde]
        rows = len(stacked)
        if gamma == "auto":
            def cosine(u, v):
                nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(a * a for a in v))
                return sum(a * c for a, c in zip(u, v)) / max(nu * nv, 1e-24)
            last_row = [cosine(stacked[k], s_tilde) for k in range(rows - 1)] + [1.0]
            graph_last_row = last_row
        else:
            transposed = [list(col) for col in zip(*eq4_as_printed(rows, gamma))]
            graph_last_row = transposed[rows - 1]
        # Full A S W for the last row: (A S)[last, i] = sum_k A[last, k] S[k, i]; then times W.
        aggregated = [sum(graph_last_row[k] * stacked[k][i] for k in range(rows)) for i in range(d)]
        pre_gcn.append([sum(aggregated[i] * w1[j][i] for i in range(d)) for j in range(d)])
    for row in normalised(router, pre_gcn, "gcn_norm"):
        s_n = [max(0.0, v) for v in row]
        logits = [sum(s_n[i] * w2[o][i] for i in range(d)) + b2[o] for o in range(2)]
        s_out.append(s_n)
        logits_out.append(logits)
    return torch.tensor(s_out), torch.tensor(logits_out)


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, "auto"])
@pytest.mark.parametrize("available", [0, 1, 2, 4])
def test_router_matches_loop_reference(gamma, available):
    torch.manual_seed(1)
    r, d, channels = 3, 6, 5
    router = RelationalRouter(channels, d=d, r=r, gamma=gamma)
    x = torch.randn(3, channels, 4, 4).abs()
    previous = [torch.rand(3, d) for _ in range(available)]  # r = 3 > available for the first blocks
    s_n, logits = router(x, previous)
    ref_s, ref_logits = reference_router(router, x, previous, gamma, r)
    torch.testing.assert_close(s_n, ref_s, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("gamma", [0.5, "auto"])
def test_router_with_batch_norm_matches_loop_reference(gamma, training):
    """norm="batch": a BatchNorm after the aligning FC and after the GCN, each before its ReLU;
    batch statistics in training, the running ones (here set to arbitrary values) in eval."""
    torch.manual_seed(6)
    router = RelationalRouter(5, d=6, r=2, gamma=gamma, norm="batch").train(training)
    with torch.no_grad():
        for bn in (router.align_norm, router.gcn_norm):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    x = torch.randn(4, 5, 3, 3).abs()
    previous = [torch.rand(4, 6) for _ in range(2)]
    ref_s, ref_logits = reference_router(router, x, previous, gamma, 2)
    s_n, logits = router(x, previous)
    torch.testing.assert_close(s_n, ref_s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)


def test_batch_norm_router_separates_images_whose_features_share_a_large_common_part():
    """Why the router has a BatchNorm (docs/method.md): GAP features that differ between images
    by 1 % of a part they all share give the paper's router nearly one margin for every image; the
    normalised router sees the differences at full scale."""
    torch.manual_seed(7)
    common = torch.rand(1, 32, 1, 1) * 2
    x = (common + 0.02 * torch.randn(256, 32, 1, 1)).expand(256, 32, 4, 4)
    spreads = {}
    for norm in ("none", "batch"):
        torch.manual_seed(8)
        router = RelationalRouter(32, d=64, r=2, gamma=0.5, norm=norm).train()
        _, logits = router(x, [])
        spreads[norm] = float((logits[:, 1] - logits[:, 0]).detach().std())
    assert spreads["batch"] > 10 * spreads["none"], spreads


def test_unknown_router_norm_is_refused():
    with pytest.raises(ValueError, match="norm='layer'.*none.*batch"):
        RelationalRouter(4, d=8, norm="layer")
    with pytest.raises(ValueError, match="router_norm='layer'"):
        create_model("resnet20", d=8, router_norm="layer")


def test_gamma_zero_is_the_vanilla_router():
    torch.manual_seed(2)
    router = RelationalRouter(4, d=8, r=2, gamma=0.0)
    x = torch.randn(2, 4, 3, 3)
    alone, _ = router(x, [])
    with_history, _ = router(x, [torch.rand(2, 8) * 10, torch.rand(2, 8) * 10])
    torch.testing.assert_close(alone, with_history)
    assert router.num_rows(5) == 1


def test_auto_weights_depend_on_the_features():
    torch.manual_seed(3)
    router = RelationalRouter(4, d=8, r=2, gamma="auto")
    x = torch.randn(2, 4, 3, 3)
    a, _ = router(x, [torch.rand(2, 8)])
    b, _ = router(x, [torch.rand(2, 8)])
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("gamma", [0.5, "auto"])
def test_model_chains_router_features_like_a_loop_reference(gamma):
    """Joint eval: router n sees x_n and s_{n-r}..s_{n-1} (not the gates); u_n = [logit_1 > logit_0]."""
    torch.manual_seed(4)
    model = create_model("resnet20", num_classes=7, gamma=gamma, r=2, d=8).eval()
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        out = model(images)
        x = model.stem(images)
        features, gates = [], []
        for n, block in enumerate(model.blocks):
            s_n, logits = model.routers[n](x, list(features))
            features.append(s_n)
            u = [1.0 if logits[b, 1] > logits[b, 0] else 0.0 for b in range(len(images))]
            gates.append(u)
            x = torch.stack([block(x[b:b + 1])[0] if u[b] else block.shortcut(x[b:b + 1])[0]
                             for b in range(len(images))])
        ref_logits = model.fc(x.mean(dim=(2, 3)))
    torch.testing.assert_close(out.gates, torch.tensor(gates).T)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert 0 < out.gates.sum() < out.gates.numel(), "the test needs both decisions to occur"


def test_training_gates_are_gumbel_softmax_of_router_logits():
    """v_n = gumbel_softmax(logits, tau)[execute]; the same RNG stream reproduces the model's gates."""
    model = create_model("resnet20", d=8, tau=0.7).train()
    images = torch.randn(4, 3, 8, 8)
    torch.manual_seed(5)
    out = model(images)
    torch.manual_seed(5)
    with torch.no_grad():
        x = model.stem(images)
        features, gates = [], []
        for n, block in enumerate(model.blocks):
            s_n, logits = model.routers[n](x, features)
            features.append(s_n)
            v = F.gumbel_softmax(logits.float(), tau=0.7)[:, 1]
            gates.append(v)
            vb = v.view(-1, 1, 1, 1)
            x = vb * block(x) + (1 - vb) * block.shortcut(x)
        ref_logits = model.fc(x.mean(dim=(2, 3)))
    torch.testing.assert_close(out.gates, torch.stack(gates, 1))
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert ((out.gates > 0) & (out.gates < 1)).all(), "relaxed gates lie strictly inside (0, 1)"


@pytest.mark.parametrize("gamma", [0.5, "auto"])
def test_router_computes_in_its_weights_dtype_under_autocast(gamma):
    """Under bf16 autocast the router runs as in fp32 (autocast off inside it: no bf16 casts of
    its weights), from a bf16 GAP too; a router whose weights are bf16 computes in bf16."""
    torch.manual_seed(2)
    router = RelationalRouter(6, d=8, r=2, gamma=gamma)
    x = torch.randn(4, 6, 3, 3)
    previous = [torch.randn(4, 8) for _ in range(2)]
    pooled = torch.randn(4, 6)
    want = router(x, previous, pooled)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router(x, previous, pooled)
        from_bf16 = router(x, previous, pooled.bfloat16())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert all(t.dtype == torch.float32 for t in from_bf16)
    torch.testing.assert_close(from_bf16[1], router(x, previous, pooled.bfloat16().float())[1], rtol=0, atol=0)
    half = RelationalRouter(6, d=8, r=2, gamma=gamma).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(t.dtype == torch.bfloat16 for t in half(x.bfloat16(), [p.bfloat16() for p in previous]))
