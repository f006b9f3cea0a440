"""The same job on 1 and on N processes at one global batch: loss curves and accuracy side by side.

    python -m benchmarks.equivalence                                   # the demo job on 1 and 2 CPU processes
    python -m benchmarks.equivalence --job jobs/cifar10_r32_short.yaml --processes 1 8 \\
        --accelerate-config jobs/accelerate/multi_gpu.yaml --set data.root=/datasets/cifar

Each run is `accelerate launch --num_processes N pipeline/train.py` with data.batch_size set to
global batch / N, so every run takes the same optimizer steps with the same learning rate. The
first process count runs again with another seed (--noise-seed): the gap between those two runs
is what "within noise" means for the others. Printed per stage: the training loss (mean of the
logged steps in each tenth of the stage) of every run, the images trained per epoch (each sample
once per epoch across ranks gives the same count for every N), whether the learning rate at the
logged steps is the same (it must be: the schedule is a function of the step) and the final
validation metrics.
The last line is `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from pipeline.config import STAGES, load_config

REPO = Path(__file__).resolve().parent.parent

SEGMENTS = 10  # the loss curve is compared as the means of this many equal parts of each stage


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.equivalence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/demo.yaml")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--global-batch", type=int, default=None,
                        help="images per optimizer step over all processes (default: the job's data.batch_size)")
    parser.add_argument("--noise-seed", type=int, default=1,
                        help="seed of the repeat of the first process count (-1: no repeat)")
    parser.add_argument("--accelerate-config", default="jobs/accelerate/cpu.yaml")
    parser.add_argument("--work", type=Path, default=Path("runs/equivalence"), help="run directories go here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="job overrides for every run")
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here too")
    return parser.parse_args(argv)


def _launch(args, processes: int, seed: int, batch: int, run_dir: Path) -> str:
    accelerate = Path(sys.executable).parent / "accelerate"
    overrides = [*args.set, f"data.batch_size={batch}", f"seed={seed}", "train.progress=false"]
    cmd = [str(accelerate), "launch", "--config_file", args.accelerate_config, "--num_processes", str(processes),
           "pipeline/train.py", "--job", args.job, "--run-dir", str(run_dir)]
    cmd += [arg for pair in overrides for arg in ("--set", pair)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def _logged(run_dir: Path, stage: str, tag: str) -> list[float]:
    """`tag` (e.g. train/loss) at every logged step of the stage, in step order (from its TensorBoard events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard" / stage), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in sorted(events.Scalars(tag), key=lambda e: e.step)]


def _segments(values: list[float]) -> list[float]:
    """Means of SEGMENTS equal parts of the curve (fewer for short curves)."""
    parts = min(SEGMENTS, len(values))
    bounds = [round(i * len(values) / parts) for i in range(parts + 1)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]


def _summary(run_dir: Path, log: str) -> dict:
    result = {}
    for stage in STAGES:
        manifest_path = run_dir / stage / "final" / "manifest.json"
        if not manifest_path.exists():
            continue
        metrics = json.loads(manifest_path.read_text())["metrics"]
        trained = [int(n) for n in re.findall(rf"^{stage} epoch \d+/\d+: trained (\d+) images", log, re.M)]
        result[stage] = {"loss_curve": _segments(_logged(run_dir, stage, "train/loss")),
                         "lr_curve": _logged(run_dir, stage, "train/lr"), "images_per_epoch": sorted(set(trained)),
                         "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)}}
    return result


def _largest_gap(a: list[float], b: list[float]) -> float:
    """Largest relative difference between two segment curves."""
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def main(argv=None) -> dict:
    args = _parse(argv)
    cfg = load_config(args.job, args.set)
    global_batch = args.global_batch or cfg["data"]["batch_size"]
    runs = [(n, cfg["seed"]) for n in args.processes]
    if args.noise_seed >= 0:
        runs.append((args.processes[0], args.noise_seed))
    results = {}
    for processes, seed in runs:
        if global_batch % processes:
            raise SystemExit(f"global batch {global_batch} does not split over {processes} processes")
        name = f"n{processes}-seed{seed}"
        run_dir = args.work / name
        if run_dir.exists():
            raise SystemExit(f"{run_dir} exists: remove it or pass another --work")
        print(f"{name}: {processes} process(es) x batch {global_batch // processes}", flush=True)
        results[name] = _summary(run_dir, _launch(args, processes, seed, global_batch // processes, run_dir))

    names = list(results)
    base = names[0]
    for stage in STAGES:
        if stage not in results[base]:
            continue
        print(f"\n{stage}: training loss, mean of each tenth of the stage")
        for name in names:
            curve = " ".join(f"{v:6.3f}" for v in results[name][stage]["loss_curve"])
            print(f"  {name:14s} {curve}")
        for name in names[1:]:
            gap = _largest_gap(results[base][stage]["loss_curve"], results[name][stage]["loss_curve"])
            results[name][stage]["largest_loss_gap_vs_" + base] = gap
            print(f"  {name} vs {base}: largest relative gap {gap:.3f}")
            # the schedule is a function of the step: any difference is a bug, not noise
            lr_gap = _largest_gap(results[base][stage]["lr_curve"], results[name][stage]["lr_curve"])
            results[name][stage]["largest_lr_gap_vs_" + base] = lr_gap
            print(f"  {name} vs {base}: learning rate at the logged steps " +
                  ("the same" if lr_gap < 1e-6 else f"DIFFERS, by up to {lr_gap:.3f} relative"))
        for name in names:
            r = results[name][stage]
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in r["metrics"].items())
            print(f"  {name:14s} images per epoch {r['images_per_epoch']}; {metrics}")
    result = {"job": args.job, "global_batch": global_batch, "runs": results}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
