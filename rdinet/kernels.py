"""Triton kernels: the frozen network's 1x1 convolution over the executing samples' pixel rows
(rdinet.inference), the training blend of eq. 9 with its backward (rdinet.executor), and the
SRM's colour histograms (rdinet.srm).

Each runs on CUDA tensors; on the CPU the same functions run as plain torch ops, and the Triton
kernels themselves run in Triton's interpreter when asked (use_triton=True) and TRITON_INTERPRET=1
was set before triton was imported (the tests do both).

Rows: a 1x1 convolution that reads only the samples executing a block and writes their results
back in place.

Activations are channels_last, so a (B, C, H, W) tensor is a (B*H*W, C) matrix of pixel rows and
sample b owns rows [b*H*W, (b+1)*H*W). A 1x1 convolution is that matrix times W^T. Skipping a
block for some samples then needs no copy of the rest:

- `gather_linear`: rows of the samples in `index` @ W^T + b (ReLU): the block's first 1x1
  convolution reads the executing samples straight from x (no gathered copy of x);
- `linear_scatter_`: out[rows of index] = ReLU(y @ W^T + b + out[rows of index]): the block's last
  1x1 convolution adds its result to the shortcut and writes it into the shortcut's own rows.

One kernel does both.

Blend: y = s + v (ReLU(r + s) - s) per sample (eqs. 1 and 9: r the residual branch, s the
shortcut, v the sample's relaxed gate) in one pass, and its backward in one more (dr, ds and the
per-sample dv), over any layout whose outermost dimension is the batch. Unfused, autograd runs
it as about ten passes, several of them PyTorch's slow broadcasting kernels (v is (B, 1, 1, 1)).
The forward can also sum y over each channel's pixels (the next router's GAP) and the backward
add that mean's gradient to y's, so the GAP costs neither a read of y nor a full-size add.

Histograms: each program counts a block of pixels of one image channel into its bins in
registers and adds them to the image's counts with one atomic add per bin (a scatter-add of
every pixel into 3 x bins counters per image waits on their atomics instead).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path below still runs
    triton = None

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# RDINET_AUTOTUNE=1: time six tile shapes per layer shape on first use instead of choosing one by
# rule (_tiles); slower to start (each shape compiles), for finding the rule on another GPU.
AUTOTUNE = os.environ.get("RDINET_AUTOTUNE") == "1"


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the kernels run by default for tensors like `t`: on CUDA, with triton installed."""
    return triton is not None and t.is_cuda


def use_triton_for(t: torch.Tensor, use_triton: bool | None) -> bool:
    """use_triton resolved for tensors like `t`: None means `triton_runs_on(t)`; True is checked."""
    if use_triton is None:
        return triton_runs_on(t)
    if use_triton and not (triton is not None and (t.is_cuda or INTERPRETING)):
        raise RuntimeError("use_triton=True needs triton and a CUDA tensor, or TRITON_INTERPRET=1 set before "
                           "triton is imported (Triton's CPU interpreter)")
    return use_triton


def kernels_serve(t: torch.Tensor, use_triton: bool | None = None) -> bool:
    """use_triton_for(t, use_triton), and not while torch.compile traces: there the torch ops
    stay, which inductor fuses itself."""
    return use_triton_for(t, use_triton) and not torch.compiler.is_compiling()


def gather_linear(x_rows: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, index: torch.Tensor | None,
                  rows_per_sample: int, relu: bool, use_triton: bool | None = None) -> torch.Tensor:
    """(rows of the samples in `index`, or all rows) @ weight_t + bias, ReLU'd if `relu`.

    x_rows (B*P, K), weight_t (K, N), bias (N,), index (k,) sample numbers: returns (k*P, N).
    """
    samples = x_rows.shape[0] // rows_per_sample if index is None else index.numel()
    out = x_rows.new_empty(samples * rows_per_sample, weight_t.shape[1])
    _rows_linear(x_rows, index, weight_t, bias, out, None, samples, rows_per_sample, False, relu, use_triton)
    return out


def linear_scatter_(y_rows: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, out_rows: torch.Tensor,
                    index: torch.Tensor | None, rows_per_sample: int, relu: bool = True,
                    use_triton: bool | None = None) -> torch.Tensor:
    """out_rows[rows of sample index[i]] = ReLU(y_rows[rows of i] @ weight_t + bias + those rows), in place.

    y_rows (>= k*P, K) holds the k executing samples in `index` order (extra rows are ignored);
    out_rows (B*P, N) is the shortcut, and afterwards the block's output; index=None: all samples.
    """
    samples = out_rows.shape[0] // rows_per_sample if index is None else index.numel()
    _rows_linear(y_rows, None, weight_t, bias, out_rows, index, samples, rows_per_sample, True, relu, use_triton)
    return out_rows


def _rows_linear(a, a_index, weight_t, bias, out, out_index, samples, rows_per_sample, residual, relu, use_triton):
    m, (k, n) = samples * rows_per_sample, weight_t.shape
    if a.shape[1] != k or out.shape[1] != n or bias.shape != (n,):
        raise ValueError(f"shapes do not fit: rows {tuple(a.shape)}, weight_t {tuple(weight_t.shape)}, "
                         f"bias {tuple(bias.shape)}, out {tuple(out.shape)}")
    if m == 0:
        return
    if not use_triton_for(a, use_triton):
        _rows_linear_torch(a, a_index, weight_t, bias, out, out_index, m, rows_per_sample, residual, relu)
        return
    for t in (a, weight_t, bias, out):
        if not t.is_contiguous():
            raise ValueError("the fused kernel needs contiguous row matrices (channels_last activations)")
    # Unused index pointers get a valid tensor; the GATHER/SCATTER flags keep them unread.
    a_index_arg = a_index.contiguous() if a_index is not None else bias
    out_index_arg = out_index.contiguous() if out_index is not None else bias
    args = (a, a_index_arg, weight_t, bias, out, out_index_arg, m, n, k, rows_per_sample)
    # float32 products in full precision unless torch's own matmuls may use TF32
    tf32 = a.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    flags = dict(GATHER=a_index is not None, SCATTER=out_index is not None, RESIDUAL=residual, RELU=relu,
                 PRECISION="tf32" if tf32 else "ieee")
    if a.is_cuda and AUTOTUNE:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
        _tuned_kernel()[grid](*args, _m_class(m), **flags)
        return
    tiles = _tiles(m, n, k, residual) if a.is_cuda else dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32)  # interpreter
    grid = (triton.cdiv(n, tiles["BLOCK_N"]), triton.cdiv(m, tiles["BLOCK_M"]))
    _kernel_named("rows", _rows_linear_kernel)[grid](*args, 0, **flags, **tiles, EVEN_K=k % tiles["BLOCK_K"] == 0)


def _rows_linear_torch(a, a_index, weight_t, bias, out, out_index, m, rows_per_sample, residual, relu):
    """The kernel's contract in plain torch ops (accumulating in float32, like the kernel)."""
    k, n = weight_t.shape
    if a_index is not None:
        a = a.view(-1, rows_per_sample, k)[a_index].reshape(-1, k)
    acc = torch.addmm(bias.float(), a[:m].float(), weight_t.float())
    view = out.view(-1, rows_per_sample, n)
    if residual:
        acc += (view[out_index] if out_index is not None else view).reshape(-1, n).float()
    if relu:
        acc.relu_()
    acc = acc.to(out.dtype).view(-1, rows_per_sample, n)
    if out_index is not None:
        view.index_copy_(0, out_index, acc)
    else:
        view.copy_(acc)


def channel_histograms(images: torch.Tensor, bins: int, mean: torch.Tensor | None = None,
                       std: torch.Tensor | None = None) -> torch.Tensor:
    """Triton form of rdinet.srm.color_histograms (which checks the arguments): (B, 3, H, W) uint8
    images, or float images with per-channel `mean`/`std` tensors (3,) in 0..255 units -> (B, 3 * bins)."""
    batch, channels, height, width = images.shape
    counts = torch.zeros(batch * channels * bins, dtype=torch.int32, device=images.device)
    uint8 = images.dtype == torch.uint8
    if uint8:
        mean = std = counts  # unread
    block = 1024 if images.is_cuda else 256
    grid = (batch * channels, triton.cdiv(height * width, block))
    kernel = _kernel_named("histogram", _channel_histograms_kernel)
    kernel[grid](images, counts, mean, std, height * width, width, *images.stride(), CHANNELS=channels, BINS=bins,
                 BINS_P2=triton.next_power_of_2(bins), UINT8=uint8, BLOCK=block)
    return counts.view(batch, channels * bins).float() / float(height * width)


def blend(residual: torch.Tensor, shortcut: torch.Tensor, gate: torch.Tensor, with_mean: bool = False):
    """shortcut + gate * (ReLU(residual + shortcut) - shortcut), gate (B,) per sample; Triton kernels,
    differentiable in all three. residual and shortcut: the same shape, dtype and dense layout.

    with_mean=True returns (out, mean): mean is out's average over H and W, (B, C) in float32 (the
    dtype it is summed in), the GAP the next block's router reads, from the same pass (no second read
    of out); its gradient is added to out's inside the backward's pass (no full-size add of an
    expanded one)."""
    return _Blend.apply(residual, shortcut, gate, with_mean)


def blend_fits(residual: torch.Tensor, shortcut: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether `blend` takes these tensors (else use the torch formula)."""
    return (residual.shape == shortcut.shape and residual.stride() == shortcut.stride()
            and residual.dtype == shortcut.dtype and residual.dtype in _BLEND_DTYPES
            and gate.shape == residual.shape[:1] and _dense_batch_outermost(residual))


def _dense_batch_outermost(t: torch.Tensor) -> bool:
    return t.dim() == 4 and (t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last))


_BLEND_TILE = 2048  # elements a program loads per loop step
_BLEND_CHANNELS = 64  # channels per program in channels_last: >= 4 programs per sample at 256 channels
_BLEND_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # it computes in float32


@functools.lru_cache(maxsize=None)
def _blend_walk(shape: tuple, channels_last: bool) -> tuple:
    """(grid, scalar args, block sizes) of the blend kernels for a dense (B, C, H, W) tensor.

    Each sample is a (pixels, channels) matrix; a program takes BLOCK_C of its channels and loops
    over all its pixels in tiles of BLOCK_P, the tile's fast axis along memory (channels in
    channels_last, pixels otherwise), so it can also sum those channels' pixels (the GAP). Cached:
    the kernels are launched once per block per step, and this is Python on the launching thread."""
    batch, channels, height, width = shape
    pixels = height * width
    if channels_last:
        block_c = min(triton.next_power_of_2(channels), _BLEND_CHANNELS)
        block_p = min(_BLEND_TILE // block_c, triton.next_power_of_2(pixels))
        strides = (channels, 1)  # (pixel, channel)
    else:
        block_p = min(triton.next_power_of_2(pixels), 1024)
        block_c = min(_BLEND_TILE // block_p, triton.next_power_of_2(channels))
        strides = (1, pixels)
    grid = (batch, triton.cdiv(channels, block_c))
    return grid, (pixels, channels, *strides, 1.0 / pixels), dict(BLOCK_P=block_p, BLOCK_C=block_c)


def _walk_of(t: torch.Tensor) -> tuple:
    return _blend_walk(tuple(t.shape), t.is_contiguous(memory_format=torch.channels_last))


class _Blend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, shortcut, gate, with_mean):
        ctx.set_materialize_grads(False)
        ctx.walk = grid, scalars, blocks = _walk_of(residual)  # the backward walks the same way
        out = torch.empty_like(residual)
        # the mean in float32, the dtype it is summed in and the routers compute in
        mean = residual.new_empty(residual.shape[:2], dtype=torch.float32) if with_mean else out  # unread if not MEAN
        # gate: a strided column of the routers' (B, 2) softmax, read in place
        _kernel_named("blend", _blend_kernel)[grid](residual, shortcut, gate, gate.stride(0), out, mean, *scalars,
                                                     MEAN=with_mean, **blocks)
        ctx.save_for_backward(residual, shortcut, gate)
        return (out, mean) if with_mean else out

    @staticmethod
    def backward(ctx, grad, grad_mean=None):
        residual, shortcut, gate = ctx.saved_tensors
        if grad is None:
            grad = torch.zeros_like(residual)
        elif grad.stride() != residual.stride():  # the kernel walks all three in the same order
            grad = torch.empty_like(residual).copy_(grad)
        grid, scalars, blocks = ctx.walk
        grad_residual, grad_shortcut = torch.empty_like(residual), torch.empty_like(shortcut)
        partial = torch.empty(grid, dtype=torch.float32, device=residual.device)  # per program: its dv terms
        mean_grad = grad_mean.contiguous() if grad_mean is not None else partial  # unread without MEAN_GRAD
        _kernel_named("blend_backward", _blend_backward_kernel)[grid](
            grad, mean_grad, residual, shortcut, gate, gate.stride(0), grad_residual, grad_shortcut, partial,
            *scalars, MEAN_GRAD=grad_mean is not None, **blocks)
        # per-program sums added in a fixed order: the gate's gradient is deterministic
        return grad_residual, grad_shortcut, partial.sum(dim=1).to(gate.dtype), None


def _tiles(m: int, n: int, k: int, residual: bool) -> dict:
    """Tile shape and launch settings, the rule read off autotuning every ResNet-50 layer shape on
    an H200 (RDINET_AUTOTUNE=1): 64-row tiles for few rows (batch 1); with the residual epilogue
    (the block's last convolution) 64 x 128 tiles, 128 x 256 at 2048 channels; otherwise 128 rows
    and up to 128 columns (256 for 256 outputs). One compiled kernel serves each tile shape."""
    if m < 4096:
        bm, bn, warps, stages = 64, 64 if n <= 128 else 128, 4, 4
    elif residual:
        bm, bn, warps, stages = (128, 256, 8, 3) if n >= 2048 else (64, 128, 4, 4)
    elif n <= 64:
        bm, bn, warps, stages = 128, 64, 4, 4
    else:
        bm, bn, warps, stages = 128, 256 if n == 256 else 128, 8, 3
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64 if k >= 64 else 32, num_warps=warps, num_stages=stages)


def _m_class(m: int) -> int:
    """The row count's size class in the autotuning key: few rows (batch 1) or many. Any finer
    class would re-tune whenever the number of executing samples crossed a boundary."""
    return int(m >= 4096)


if triton is not None:
    def _rows_linear_kernel(a_ptr, a_index_ptr, w_ptr, bias_ptr, out_ptr, out_index_ptr, M, N, K, P, m_class,
                            GATHER: tl.constexpr, SCATTER: tl.constexpr, RESIDUAL: tl.constexpr,
                            RELU: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        pid_n = tl.program_id(0)  # the N tiles of one row tile run side by side: its rows stay in L2
        pid_m = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < M, cols < N
        sample = rows // P
        pixel = (rows - sample * P).to(tl.int64)
        if GATHER:
            a_rows = tl.load(a_index_ptr + sample, mask=row_ok, other=0).to(tl.int64) * P + pixel
        else:
            a_rows = rows.to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * K + ks[None, :]
        w_ptrs = w_ptr + ks[:, None] * N + cols[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = (k0 + ks) < K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * N
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if SCATTER:
            out_rows = tl.load(out_index_ptr + sample, mask=row_ok, other=0).to(tl.int64) * P + pixel
        else:
            out_rows = rows.to(tl.int64)
        offsets = out_rows[:, None] * N + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        if RESIDUAL:  # each element is read and then written by this same program: in place is safe
            acc += tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)

    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 64, 64, 4, 4), (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3),
            (256, 64, 64, 8, 3), (64, 64, 64, 4, 4),
        ]
    ]

    def _prune(configs, named_args, **kwargs):
        n, k = named_args["N"], named_args["K"]
        kept = [c for c in configs if c.kwargs["BLOCK_N"] <= max(64, n) and c.kwargs["BLOCK_K"] <= max(32, k)]
        return kept or configs[:1]

    _CACHE: dict[str, object] = {}

    def _kernel_named(name, fn):
        """The jitted kernel of `fn`, made on first use (see the module's note on the interpreter)."""
        if name not in _CACHE:
            _CACHE[name] = triton.jit(fn)
        return _CACHE[name]

    def _tuned_kernel():
        if "tuned" not in _CACHE:
            even_k = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
            # Tuning runs the kernel several times; in place (RESIDUAL) it must see the same input each time.
            key = ["N", "K", "P", "m_class", "GATHER", "SCATTER", "RESIDUAL", "PRECISION"]
            tune = triton.autotune(_CONFIGS, key=key, prune_configs_by={"early_config_prune": _prune},
                                   restore_value=["out_ptr"], warmup=5, rep=25)
            _CACHE["tuned"] = tune(even_k(triton.jit(_rows_linear_kernel)))
        return _CACHE["tuned"]

    def _channel_histograms_kernel(image_ptr, counts_ptr, mean_ptr, std_ptr, P, W, stride_b, stride_c, stride_h,
                                   stride_w, CHANNELS: tl.constexpr, BINS: tl.constexpr, BINS_P2: tl.constexpr,
                                   UINT8: tl.constexpr, BLOCK: tl.constexpr):
        image_channel = tl.program_id(0)  # b * CHANNELS + c
        b, c = image_channel // CHANNELS, image_channel % CHANNELS
        pixels = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = pixels < P
        h, w = pixels // W, pixels % W
        offsets = b.to(tl.int64) * stride_b + c * stride_c + h.to(tl.int64) * stride_h + w * stride_w
        values = tl.load(image_ptr + offsets, mask=ok, other=0)
        if UINT8:
            index = values.to(tl.int32) * BINS // 256
        else:  # de-normalise to 0..255 as srm.denormalise does, then equal-width bins over [0, 256)
            values = values.to(tl.float32) * tl.load(std_ptr + c) + tl.load(mean_ptr + c)
            index = tl.floor(values * (BINS / 256.0)).to(tl.int32)
            index = tl.minimum(tl.maximum(index, 0), BINS - 1)
        index = tl.where(ok, index, -1)
        bin_ids = tl.arange(0, BINS_P2)
        counts = tl.sum((index[:, None] == bin_ids[None, :]).to(tl.int32), axis=0)
        tl.atomic_add(counts_ptr + image_channel * BINS + bin_ids, counts, mask=bin_ids < BINS)

    def _blend_kernel(res_ptr, sc_ptr, gate_ptr, gate_stride, out_ptr, mean_ptr, P, C, stride_p, stride_c, inv_p,
                      MEAN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        sample = tl.program_id(0)
        channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        base = sample.to(tl.int64) * P * C
        v = tl.load(gate_ptr + sample * gate_stride).to(tl.float32)
        sums = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for first in range(0, P, BLOCK_P):
            pixels = first + tl.arange(0, BLOCK_P)
            ok = (pixels < P)[:, None] & (channels < C)[None, :]
            offsets = base + pixels[:, None].to(tl.int64) * stride_p + channels[None, :] * stride_c
            r = tl.load(res_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            s = tl.load(sc_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            y = s + v * (tl.maximum(r + s, 0.0) - s)  # 0 where masked
            tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=ok)
            if MEAN:
                sums += y
        if MEAN:
            mean = tl.sum(sums, axis=0) * inv_p
            tl.store(mean_ptr + sample * C + channels, mean.to(mean_ptr.dtype.element_ty), mask=channels < C)

    def _blend_backward_kernel(grad_ptr, mean_grad_ptr, res_ptr, sc_ptr, gate_ptr, gate_stride, grad_res_ptr,
                               grad_sc_ptr, partial_ptr, P, C, stride_p, stride_c, inv_p, MEAN_GRAD: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        sample, channel_block = tl.program_id(0), tl.program_id(1)
        channels = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)
        base = sample.to(tl.int64) * P * C
        v = tl.load(gate_ptr + sample * gate_stride).to(tl.float32)
        if MEAN_GRAD:  # d mean / d out = 1 / (H * W) for every pixel of the channel
            from_mean = tl.load(mean_grad_ptr + sample * C + channels, mask=channels < C, other=0.0).to(tl.float32)
            from_mean = from_mean * inv_p
        gate_terms = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for first in range(0, P, BLOCK_P):
            pixels = first + tl.arange(0, BLOCK_P)
            ok = (pixels < P)[:, None] & (channels < C)[None, :]
            offsets = base + pixels[:, None].to(tl.int64) * stride_p + channels[None, :] * stride_c
            g = tl.load(grad_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            if MEAN_GRAD:
                g = tl.where(ok, g + from_mean[None, :], 0.0)
            r = tl.load(res_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            s = tl.load(sc_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            total = r + s
            g_out = tl.where(total > 0, g * v, 0.0)  # through ReLU(r + s), weighted by v
            tl.store(grad_res_ptr + offsets, g_out.to(grad_res_ptr.dtype.element_ty), mask=ok)
            tl.store(grad_sc_ptr + offsets, (g * (1.0 - v) + g_out).to(grad_sc_ptr.dtype.element_ty), mask=ok)
            gate_terms += g * (tl.maximum(total, 0.0) - s)
        program = sample * tl.num_programs(1) + channel_block
        tl.store(partial_ptr + program, tl.sum(tl.sum(gate_terms, axis=1), axis=0))
