"""Speed of RDI-Net against the static ResNet, each baseline measured in the same run.

    python -m benchmarks.model_bench [--device cuda] [--out benchmarks/results/NAME.json]

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
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.timing import Timer, gpu_ms_per_call
from benchmarks.workloads import (ARCHS, MEAN, STD, from_loader, generated_loader, make_model, make_training_model,
                                  synthetic, train_step_fn)
from pipeline.config import nests_cuda_graphs
from rdinet import inference, kernels, model_cost, srm

RATES = (1.0, 0.65, 0.5, 0.3)
SKIP_BUCKETS = (1, 32)  # real-skipping rows: exact sample counts, and rounded up to multiples of 32
FROZEN_BUCKETS = (1, 32)  # the frozen net's rows (rdinet.inference; 32 is freeze's default)


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

    def run():  # the gradient the rank loss sends back to the routers' paths
        hist = srm.color_histograms(images, bins=16, mean=MEAN, std=STD)
        torch.autograd.grad(srm.rank_loss(paths, hist), paths)
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
