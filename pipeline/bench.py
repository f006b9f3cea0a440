"""Speed of RDI-Net against the static ResNet, each baseline measured in the same run.

    python -m pipeline.bench [--device cuda] [--out benchmarks/results/NAME.json]

1. training img/s: static backbone on synthetic data (baseline), RDI-Net joint mode on synthetic
   data (router + SRM overhead), RDI-Net fed by the DALI loader (loader overhead); with
   --cuda-graph each step is captured once and replayed (pipeline.graphed_step);
2. inference img/s at batch 256 and 1: static vs RDI-Net with real skipping at execution rates
   1.0, 0.65, 0.5, 0.3 (random decisions), next to the cost ratio;
3. SRM histogram + rank loss time per batch.
Times are medians of repeated timed windows after warm-up (CUDA events on the GPU). On the CPU
it runs at tiny sizes (--tiny) so the tests cover it.
"""
from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rdinet
from rdinet import inference, kernels, model_cost, srm
from rdinet.losses import total_loss

from .config import nests_cuda_graphs
from .graphed_step import GraphedStep

ARCHS = {"resnet50": (224, 1000), "resnet110": (32, 10)}
RATES = (1.0, 0.65, 0.5, 0.3)
SKIP_BUCKETS = (1, 32)  # real-skipping rows: exact sample counts, and rounded up to multiples of 32
FROZEN_BUCKETS = (1, 32)  # the frozen net's rows (rdinet.inference; 32 is freeze's default)


class Timer:
    """Seconds per call of `fn`: median over `repeats` windows of `iters` calls, after `warmup` calls."""

    def __init__(self, device: torch.device, warmup: int, iters: int, repeats: int):
        self.device, self.warmup, self.iters, self.repeats = device, warmup, iters, repeats

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(self.iters):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000 / self.iters)
            else:
                tick = time.perf_counter()
                for _ in range(self.iters):
                    fn()
                times.append((time.perf_counter() - tick) / self.iters)
        return statistics.median(times)


def gpu_ms_per_call(fn, calls: int = 10) -> float:
    """Summed duration of the GPU operations (kernels, copies, fills) one call of `fn` runs
    (torch.profiler), in ms."""
    return sum(end - start for start, end in cuda_intervals(fn, calls)) / calls / 1000


def cuda_intervals(fn, calls: int) -> list[tuple[float, float]]:
    """(start, end) in us of every CUDA kernel, copy and fill that `calls` calls of `fn` run."""
    return [(e.time_range.start, e.time_range.end) for e in cuda_events(fn, calls)]


def cuda_events(fn, calls: int, warmup: int = 1) -> list:
    """torch.profiler's events of every CUDA kernel, copy and fill that `calls` calls of `fn` run
    (.time_range in us, .device_resource_id the stream), after `warmup` unprofiled calls."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def idle_gaps_us(intervals) -> list[float]:
    """The idle stretches (us) between consecutive GPU operations, given as (start, end) in us."""
    gaps, busy_until = [], None
    for start, end in sorted(intervals):
        if busy_until is not None and start > busy_until:
            gaps.append(start - busy_until)
        busy_until = end if busy_until is None else max(busy_until, end)
    return gaps


def short_gaps_us(intervals, below_us: float = 20.0) -> float:
    """Summed idle time between consecutive GPU operations, counting only gaps shorter than
    `below_us`: what the GPU spends between dependent kernels on its own (a few us each, inside
    CUDA graphs too). Longer gaps are waits for the host, which the profiler itself lengthens."""
    return sum((gap for gap in idle_gaps_us(intervals) if gap < below_us), 0.0)


def eager_ops_per_call(fn, calls: int = 3) -> dict[str, float]:
    """The aten ops one call of `fn` dispatches outside torch.compile's graphs (top-level ones, by
    name; torch.profiler): host work on every device, and on a GPU launches outside CUDA graphs."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    counts = collections.Counter(e.name for e in prof.events()
                                 if e.name.startswith("aten::") and not _nested_or_compiled(e))
    return {name: n / calls for name, n in counts.most_common()}


def _nested_or_compiled(event) -> bool:
    """Inside another aten op, or inside a compiled graph ("Torch-Compiled Region", "CompiledFunction",
    "CompiledFunctionBackward", "## Call CompiledFxGraph ...")."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::") or "Compiled" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def make_model(arch: str, classes: int, mode: str, device, d: int = 256):
    model = rdinet.create_model(arch, num_classes=classes, d=d).to(device, memory_format=torch.channels_last)
    return model.set_mode(mode)


def make_training_model(arch: str, classes: int, mode: str, device):
    """make_model in train mode; the static network ("full") keeps its routers, which never run,
    out of the optimizer, as the trainer does."""
    model = make_model(arch, classes, mode, device).train()
    if mode == "full":
        for p in model.router_parameters():
            p.requires_grad_(False)
    return model


def train_step_fn(model, batch_source, bf16: bool, mean, std, joint: bool, cuda_graph: bool = False):
    """One training step per call: SGD on the classification loss (static) or eq. 16 (joint).
    With cuda_graph the whole step is captured on the first batch and replayed (GraphedStep, as
    train.cuda_graph trains), with the fused SGD that a replay needs."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, fused=cuda_graph or None)
    device_type = next(model.parameters()).device.type

    def loss_terms(images, logits, gates, labels):
        if not joint:
            return {"loss": F.cross_entropy(logits.float(), labels)}
        hist = srm.color_histograms(images, bins=16, mean=mean, std=std)
        return total_loss(logits.float(), labels, gates.float(), hist, t=0.5, alpha=0.2)

    def step():
        images, labels = batch_source()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            out = model(images)
        loss_terms(images, out.logits, out.gates, labels)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    captured = []

    def graphed_step():
        images, labels = batch_source()
        if not captured:
            captured.append(GraphedStep(model, opt, loss_terms, images, labels, bf16))
        captured[0](images, labels)
    return graphed_step if cuda_graph else step


def synthetic(batch: int, size: int, classes: int, device):
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch,), device=device)
    return lambda: (images, labels)


def from_loader(loader):
    """Endless batches from a DALI loader (epochs roll over)."""
    state = {"it": iter(loader)}

    def next_batch():
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])
    return next_batch


def generated_loader(arch: str, batch: int, device, tmp: Path, tiny: bool, decode_device: str = "mixed"):
    from pipeline.data import build_loader
    from pipeline.data.generate import ensure_generated
    size, classes = ARCHS[arch]
    dataset = "imagenet" if size == 224 else "cifar10"
    # 2 * batch per class: 20 full batches an epoch of 10 classes, none dropped, so the timing sees
    # few epoch ends (a real ImageNet epoch has 5,005 batches)
    cfg = {"dataset": dataset, "root": str(tmp / dataset), "generate": True, "batch_size": batch,
           "generated_size": 4 if tiny else 2 * batch, "generated_classes": 10, "generated_val_size": 2,
           "num_threads": 2 if tiny else 12, "dtype": "bfloat16" if device.type == "cuda" else "float32",
           "device": "gpu" if device.type == "cuda" else "cpu", "image_size": 224 if not tiny else 64,
           "decode_device": decode_device}
    if dataset == "imagenet":
        cfg["generated_image_px"] = 64 if tiny else 400
    ensure_generated(cfg)
    loader = build_loader(cfg, "train", device_id=0 if device.type == "cuda" else None)
    return loader


MEAN, STD = (123.7, 116.3, 103.5), (58.4, 57.1, 57.4)  # any plausible 0..255 statistics for the SRM


def _workload(arch, batch, device, tiny):
    """(image size, classes, bf16?, synthetic batch source) of a training benchmark."""
    size, classes = ARCHS[arch]
    if tiny:
        size = 64 if size == 224 else size
    return size, classes, device.type == "cuda", synthetic(batch, size, classes, device)


def bench_compiled_training(arch, batch, device, timer, tiny, compile_mode: str = "default",
                            cuda_graph: bool = False) -> dict:
    """torch.compile on the training forward (shapes are static in training: soft gates blend);
    with cuda_graph the whole compiled step is captured (train_step_fn)."""
    size, classes, bf16, data = _workload(arch, batch, device, tiny)
    result = {}
    for mode in ("full", "joint"):
        model = make_training_model(arch, classes, mode, device)
        model.compile(mode=compile_mode)
        tick = time.perf_counter()
        step = train_step_fn(model, data, bf16, MEAN, STD, joint=mode == "joint", cuda_graph=cuda_graph)
        step()
        result[f"{mode}_compile_s"] = time.perf_counter() - tick
        result[f"{'static' if mode == 'full' else 'rdinet'}_compiled"] = batch / timer(step)
    result["ratio_joint_vs_static_compiled"] = result["rdinet_compiled"] / result["static_compiled"]
    return result


def dali_rows(arch: str, device) -> list[tuple[str, str]]:
    """(result key, data.decode_device) of the DALI-fed rows: on a GPU, ImageNet's JPEGs are
    decoded by the GPU ("mixed") in one row and by DALI's CPU threads in the other."""
    rows = [("rdinet_dali", "mixed")]
    if ARCHS[arch][0] == 224 and device.type == "cuda":
        rows.append(("rdinet_dali_cpu_decode", "cpu"))
    return rows


def _ratio_key(key: str) -> str:
    """rdinet_dali -> ratio_dali_vs_synthetic: a fed row's share of the synthetic-data speed."""
    return f"ratio_{key.removeprefix('rdinet_')}_vs_synthetic"


def bench_training(arch, batch, device, timer, tiny, tmp, cuda_graph: bool = False) -> dict:
    """Static and joint training on synthetic data, and joint training fed by the DALI loader;
    with cuda_graph each step is one captured CUDA graph (train_step_fn)."""
    size, classes, bf16, data = _workload(arch, batch, device, tiny)
    static = make_training_model(arch, classes, "full", device)
    result = {"cuda_graph": cuda_graph, "static_synthetic": batch / timer(
        train_step_fn(static, data, bf16, MEAN, STD, joint=False, cuda_graph=cuda_graph))}
    del static
    joint = make_training_model(arch, classes, "joint", device)
    joint_step = train_step_fn(joint, data, bf16, MEAN, STD, joint=True, cuda_graph=cuda_graph)
    result["rdinet_synthetic"] = batch / timer(joint_step)
    if device.type == "cuda":  # what the SRM's GPU work is measured against
        result["rdinet_gpu_ms_per_step"] = gpu_ms_per_call(joint_step, calls=3)
    del joint_step  # and its captured graph's memory
    for key, decode_device in dali_rows(arch, device):
        try:
            loader = generated_loader(arch, batch, device, tmp, tiny, decode_device)
        except ImportError as err:  # DALI missing on this machine
            result[key] = None
            result["dali_error"] = str(err)
            continue
        step = train_step_fn(joint, from_loader(loader), bf16, loader.mean, loader.std, joint=True,
                             cuda_graph=cuda_graph)
        result[key] = batch / timer(step)
        result[_ratio_key(key)] = result[key] / result["rdinet_synthetic"]
        del step, loader
    result["ratio_joint_vs_static"] = result["rdinet_synthetic"] / result["static_synthetic"]
    return result


@torch.no_grad()
def bench_inference(arch, batch, device, timer, tiny, buckets=SKIP_BUCKETS, frozen_buckets=FROZEN_BUCKETS,
                    compile_static: bool = False) -> dict:
    """Rows: the static network eager (bf16 autocast) and frozen (rdinet.inference: BatchNorm folded,
    bf16 weights), and torch.compile'd (inductor, BatchNorm folded by freezing) if asked; then per
    execution rate, random decisions run by the model's executors (skip, bucketed skip, masked)
    and by the frozen net at each bucket. Speedups are against the eager and the frozen static."""
    size, classes = ARCHS[arch]
    if tiny:
        size = 64 if size == 224 else size
    bf16 = device.type == "cuda"
    images, _ = synthetic(batch, size, classes, device)()
    model = make_model(arch, classes, "full", device).eval()
    frozen = inference.freeze(model)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return model(images)

    def run_frozen():
        return frozen(images)
    static = batch / timer(run)
    static_frozen = batch / timer(run_frozen)
    rows = {"static": {"img_s": static, "ratio": 1.0},
            "static_frozen": {"img_s": static_frozen, "ratio": 1.0}}
    if compile_static:
        import torch._inductor.config as inductor_config
        compiled = torch.compile(model)
        with inductor_config.patch(freezing=True):
            tick = time.perf_counter()

            def run_compiled():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    return compiled(images)
            run_compiled()
            rows["static_compiled"] = {"img_s": batch / timer(run_compiled), "ratio": 1.0,
                                       "compile_s": time.perf_counter() - tick}
        del compiled
    model.set_mode("uniform")
    variants = [("skip" if b == 1 else f"skip{b}", "skip", b) for b in buckets] + [("masked", "masked", 1)]
    variants += [(f"frozen{b}", "frozen", b) for b in frozen_buckets]
    for rate in RATES:
        model.uniform_rate = rate
        for name, executor, bucket in variants:
            if executor == "frozen":
                frozen.bucket, fn = bucket, run_frozen
            else:
                model.executor, model.skip_bucket, fn = executor, bucket, run
            torch.manual_seed(0)
            gates = fn().gates
            cost = model_cost(model, gates.float(), input_size=(3, size, size))
            # Random decisions are resampled every call; their rate is what is being measured.
            rows[f"{name}@{rate}"] = {"img_s": batch / timer(fn), "ratio": float(cost["ratio"]),
                                      "exec_rate": float(gates.float().mean())}
    for row in rows.values():
        row["speedup"] = row["img_s"] / static
        row["speedup_vs_frozen_static"] = row["img_s"] / static_frozen
    return rows


def bench_srm(batch, size, device, timer) -> dict:
    """SRM time per batch (histograms, distances, argsort, rank loss and its backward), and the
    histograms alone: the Triton kernel (on a GPU) against the torch ops.

    On a GPU also the SRM's GPU work per batch (its kernels' summed durations): run alone, back to
    back, the SRM's few small kernels wait on their own launching, so ms_per_batch is host time;
    inside a training step, whose host runs ahead of the GPU, the GPU work is what it adds."""
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    paths = torch.rand(batch, 54, device=device, requires_grad=True)

    def run():
        hist = srm.color_histograms(images, bins=16, mean=MEAN, std=STD)
        srm.rank_loss(paths, hist).backward()
    result = {"ms_per_batch": 1000 * timer(run)}
    if device.type == "cuda":
        result["gpu_ms_per_batch"] = gpu_ms_per_call(run)
    for name, use_triton in (("triton", True), ("torch", False)):
        if use_triton and not kernels.triton_runs_on(images):
            continue
        result[f"histograms_{name}_ms"] = 1000 * timer(
            lambda: srm.color_histograms(images, bins=16, mean=MEAN, std=STD, use_triton=use_triton))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tiny", action="store_true", help="small sizes and few iterations (CPU smoke run)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--compile", nargs="*", default=[], choices=list(ARCHS),
                        help="also time torch.compile'd training for these archs")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    parser.add_argument("--cuda-graph", action="store_true",
                        help="training rows: capture each whole step (forward, losses, backward, fused SGD) "
                             "as one CUDA graph and replay it, as train.cuda_graph trains (GPU)")
    parser.add_argument("--skip-buckets", type=int, nargs="+", default=list(SKIP_BUCKETS),
                        help="real skipping rounds each block's sample count up to a multiple of these "
                             "(model.skip_bucket; 1: exact counts); one row per value")
    parser.add_argument("--compile-static-inference", action="store_true",
                        help="also time the static network torch.compile'd for inference (batch 256 only)")
    parser.add_argument("--frozen-buckets", type=int, nargs="+", default=list(FROZEN_BUCKETS),
                        help="the frozen net (rdinet.inference) pads its 3x3 convolutions' batch to multiples of these")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.cuda_graph and torch.device(args.device).type != "cuda":
        parser.error("--cuda-graph captures CUDA graphs: it needs a CUDA --device")
    if args.compile and nests_cuda_graphs(args.compile_mode, args.cuda_graph):
        parser.error(f"--cuda-graph with --compile-mode {args.compile_mode}: its own CUDA graphs cannot be "
                     "captured inside the step's; use --compile-mode default")
    for option, values in (("--skip-buckets", args.skip_buckets), ("--frozen-buckets", args.frozen_buckets)):
        if min(values) < 1:
            parser.error(f"{option} {values}: each bucket must be an integer >= 1")
    device = torch.device(args.device)
    batch = 8 if args.tiny else args.batch
    timer = Timer(device, warmup=1 if args.tiny else 10, iters=1 if args.tiny else 10, repeats=2 if args.tiny else 5)
    # No cudnn.benchmark: real skipping runs blocks on ever-changing batch sizes, and autotuning
    # each new size would be timed as if it were the network's cost.
    results = {"compile_mode": args.compile_mode, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
               "torch": torch.__version__, "batch": batch, "train": {}, "inference": {}, "srm": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            if not args.skip_train:
                results["train"][arch] = bench_training(arch, batch, device, timer, args.tiny, Path(tmp),
                                                        args.cuda_graph)
            if arch in args.compile:
                results["train"].setdefault(arch, {}).update(bench_compiled_training(
                    arch, batch, device, timer, args.tiny, args.compile_mode, args.cuda_graph))
            if not args.skip_inference:
                results["inference"][arch] = {
                    f"batch{b}": bench_inference(arch, b, device, timer, args.tiny, args.skip_buckets, args.frozen_buckets,
                                                 args.compile_static_inference and b == batch)
                    for b in (batch, 1)}
            size = ARCHS[arch][0] if not args.tiny else 32
            results["srm"][arch] = bench_srm(batch, size, device, timer)
    print_table(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: dict) -> None:
    print(f"device {results['device']}, torch {results['torch']}, batch {results['batch']}")
    for arch, r in results["train"].items():
        if "static_compiled" in r:
            print(f"train {arch} compiled: static {r['static_compiled']:.0f} img/s | rdinet {r['rdinet_compiled']:.0f} "
                  f"({r['ratio_joint_vs_static_compiled']:.2f}x) | compile {r['full_compile_s']:.0f}+{r['joint_compile_s']:.0f} s")
        if "static_synthetic" not in r:
            continue
        graphed = ", each step one CUDA graph" if r.get("cuda_graph") else ""
        labels = {"rdinet_dali": "rdinet+dali", "rdinet_dali_cpu_decode": "rdinet+dali, CPU decoding"}
        fed = [f"{label} " + (f"{r[key]:.0f} ({r[_ratio_key(key)]:.2f}x of synthetic)" if r[key] else "n/a")
               for key, label in labels.items() if key in r]
        print(f"train {arch}{graphed}: static {r['static_synthetic']:.0f} img/s | rdinet {r['rdinet_synthetic']:.0f} "
              f"({r['ratio_joint_vs_static']:.2f}x) | " + " | ".join(fed))
    for arch, by_batch in results["inference"].items():
        for b, rows in by_batch.items():
            print(f"infer {arch} {b}: img/s (speedup vs eager static, vs frozen static; cost ratio)")
            for name, v in rows.items():
                print(f"  {name:16} {v['img_s']:9.0f}  {v['speedup']:5.2f}x {v['speedup_vs_frozen_static']:5.2f}x  "
                      f"cost {v['ratio']:.2f}")
    for arch, r in results["srm"].items():
        gpu = ""
        if "gpu_ms_per_batch" in r:
            step = results["train"].get(arch, {}).get("rdinet_gpu_ms_per_step")
            share = f", {100 * r['gpu_ms_per_batch'] / step:.1f} % of the joint step's" if step else ""
            gpu = f" ({r['gpu_ms_per_batch']:.2f} ms of GPU work{share})"
        print(f"srm {arch}: {r['ms_per_batch']:.2f} ms per batch{gpu}; histograms alone "
              + ", ".join(f"{k.split('_')[1]} {v:.3f} ms" for k, v in r.items() if k.startswith("histograms_")))


if __name__ == "__main__":
    raise SystemExit(main())
