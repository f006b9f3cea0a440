"""Run several jobs side by side on one machine (one GPU), sharing the warm-ups they have in common.

    python -m pipeline.sweep --runs-dir runs/r32 jobs/cifar10_r32_short/*.yaml [--set data.root=DIR]

An ablation table is many small runs. On one GPU a CIFAR RDI-Net step is bound by kernel launches,
so runs started side by side share the card far better than runs made one after another. Rows whose
USW warm-up would be identical (same backbone, data, optimiser, warm-up schedule and seed; the
routers' settings and the losses play no part in it) run it once: the export is copied into each
row's run directory, where pipeline/train.py finds the stage complete and goes on with the joint
stage. Every row is its own pipeline/train.py process (one device each), so a sweep that is stopped
(SIGTERM/SIGUSR1 are passed on: each run checkpoints) resumes when it is started again.

Writes `<runs-dir>/sweep.json` (per run: job, status, wall seconds, the warm-up it shares, the card)
and `<runs-dir>/logs/<name>.log`. Exit code: 0 every run complete, 75 stopped, 1 a run failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import checkpoint as ckpt
from pipeline.config import NOT_IN_WARMUP, ConfigError, dump, enabled_stages, load_config, without

REPO = Path(__file__).resolve().parent.parent
REQUEUE_EXIT = 75


@dataclass
class Run:
    """One process of the sweep: a row's stages, or a warm-up shared by several rows."""
    name: str
    job: str
    run_dir: Path
    stage: str | None = None  # None: every pending stage of the job
    needs: str | None = None  # name of the shared warm-up this run waits for
    final: str = "joint"  # the stage whose export marks the run complete
    status: str = "pending"  # pending, running, done, stopped, failed
    wall_s: float = 0.0
    started: float | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)


def warmup_key(cfg: dict) -> str:
    """What decides the warm-up's result: every key but those of NOT_IN_WARMUP (the job's name, the
    losses, the joint stage and the routers' relational settings: routers are frozen during USW)."""
    return dump(without(cfg, NOT_IN_WARMUP))


def plan(jobs: list[Path], overrides: list[str], runs_dir: Path) -> list[Run]:
    """A run per row, plus one warm-up run per group of rows with identical warm-ups."""
    runs, warmups = [], {}
    for job in jobs:
        cfg = load_config(job, overrides)
        name = job.stem
        if any(r.name == name for r in runs):
            raise ConfigError(f"two jobs named '{name}' ({job}): give the job files distinct names")
        stages = enabled_stages(cfg)
        row = Run(name=name, job=str(job), run_dir=runs_dir / name, final=stages[-1])
        if "warmup" in stages:
            key = warmup_key(cfg)
            if key not in warmups:
                warmups[key] = Run(name=f"warmup-{name}", job=str(job), run_dir=runs_dir / f"warmup-{name}",
                                   stage="warmup", final="warmup")
            row.needs = warmups[key].name
        runs.append(row)
    return list(warmups.values()) + runs


def is_complete(run: Run) -> bool:
    return ckpt.read_manifest(run.run_dir / run.final) is not None


def default_launcher() -> str:
    """Each row is one process on one device: pipeline/train.py builds its accelerate/DeepSpeed
    engine itself, and its exit code (75: stopped, resumable) reaches the sweep unchanged, which an
    `accelerate launch` wrapper would turn into 1."""
    return shlex.quote(sys.executable)


class Sweep:
    def __init__(self, runs: list[Run], runs_dir: Path, overrides: list[str], launcher: str, parallel: int):
        self.runs, self.runs_dir, self.overrides = runs, runs_dir, overrides
        self.launcher, self.parallel = shlex.split(launcher), parallel
        self.by_name = {r.name: r for r in runs}
        self.stop_requested = False
        # wall time of earlier sweeps over the same runs (a stopped sweep started again)
        self.earlier_wall = {name: entry["wall_s"] for name, entry in read_sweep(runs_dir).get("runs", {}).items()}
        (runs_dir / "logs").mkdir(parents=True, exist_ok=True)

    def request_stop(self, signum, _frame) -> None:
        self.stop_requested = True
        for run in self.running():
            run.process.send_signal(signum)

    def running(self) -> list[Run]:
        return [r for r in self.runs if r.status == "running"]

    def ready(self, run: Run) -> bool:
        return run.needs is None or self.by_name[run.needs].status == "done"

    def start(self, run: Run) -> None:
        if run.needs:  # hand the shared warm-up on, unless this row already has one
            source, target = self.by_name[run.needs].run_dir / "warmup", run.run_dir / "warmup"
            if ckpt.read_manifest(target) is None:
                shutil.rmtree(target, ignore_errors=True)
                run.run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copytree(source / "final", target / "final")
        cmd = [*self.launcher, "pipeline/train.py", "--job", run.job, "--run-dir", str(run.run_dir)]
        cmd += ["--stage", run.stage] if run.stage else []
        for item in self.overrides:
            cmd += ["--set", item]
        log = open(self.runs_dir / "logs" / f"{run.name}.log", "a")
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        run.process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        run.status, run.started = "running", time.time()
        print(f"started {run.name} (pid {run.process.pid})", flush=True)

    def reap(self, run: Run) -> None:
        code = run.process.poll()
        if code is None:
            return
        run.wall_s += time.time() - run.started
        if is_complete(run):
            run.status = "done"
        elif self.stop_requested or code == REQUEUE_EXIT:
            run.status = "stopped"
        else:
            run.status = "failed"
        print(f"{run.status} {run.name} (exit {code}, {run.wall_s:.0f} s)", flush=True)
        self.save()

    def blocked(self, run: Run) -> bool:
        """A row whose shared warm-up failed or stopped cannot start."""
        return run.needs is not None and self.by_name[run.needs].status in ("failed", "stopped")

    def go(self) -> int:
        for run in self.runs:
            if is_complete(run):
                run.status = "done"
        while True:
            for run in self.running():
                self.reap(run)
            pending = [r for r in self.runs if r.status == "pending" and not self.blocked(r)]
            if not self.stop_requested:
                for run in pending:
                    if len(self.running()) < self.parallel and self.ready(run):
                        self.start(run)
            if not self.running() and (self.stop_requested or not any(self.ready(r) for r in pending)):
                break
            time.sleep(1)
        self.save()
        statuses = {r.status for r in self.runs}
        if statuses == {"done"}:
            return 0
        return 1 if "failed" in statuses else REQUEUE_EXIT

    def save(self) -> None:
        record = {"card": card_name(), "runs": {}}
        for run in self.runs:
            entry = {"job": run.job, "run_dir": str(run.run_dir), "stage": run.stage, "needs": run.needs,
                     "final": run.final, "status": run.status}
            entry["wall_s"] = run.wall_s + self.earlier_wall.get(run.name, 0.0)
            record["runs"][run.name] = entry
        ckpt.write_atomic(self.runs_dir / "sweep.json", json.dumps(record, indent=1).encode())


def read_sweep(runs_dir: Path) -> dict:
    path = runs_dir / "sweep.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def card_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jobs", nargs="+", type=Path, help="job YAML files, one per row")
    parser.add_argument("--runs-dir", type=Path, required=True, help="one run directory per job goes here")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every job")
    parser.add_argument("--launcher", default=None,
                        help="command that starts pipeline/train.py (default: this python; e.g. "
                             "'accelerate launch --config_file jobs/accelerate/single_gpu.yaml')")
    parser.add_argument("--parallel", type=int, default=0, help="runs at a time (default: all)")
    args = parser.parse_args(argv)
    try:
        runs = plan(args.jobs, args.set, args.runs_dir)
    except (ConfigError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sweep = Sweep(runs, args.runs_dir, args.set, args.launcher or default_launcher(),
                  args.parallel if args.parallel > 0 else len(runs))
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, sweep.request_stop)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return sweep.go()


if __name__ == "__main__":
    sys.exit(main())
