"""The run directory: one job's config, stages, checkpoints and TensorBoard events.

A run directory belongs to one job: starting another job (or another model) in it is refused, so
nothing saved there is overwritten by mistake.

A run stopped for requeue (SIGTERM / SIGUSR1, train.stop_at_step) leaves `stopped-for-requeue.json`
in it, written by rank 0 once the checkpoint is complete on every rank and removed when a run
starts there. Launchers read it instead of the training processes' exit codes, which
`accelerate launch` does not pass on: `python -m pipeline.launch` for its last line and exit code,
slurm/launch.sh to requeue the job.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from pipeline.checkpoint import write_atomic
from pipeline.config import dump, with_defaults

REQUEUE_MARK = "stopped-for-requeue.json"
REQUEUE_EXIT = 75  # EX_TEMPFAIL: checkpoint written on a signal; run again (the SLURM templates requeue)


def is_main_rank() -> bool:
    """Rank 0 of the launch, or a process started without a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_run_dir(run_dir: Path, cfg: dict) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise PermissionError(f"cannot create run directory {run_dir}: permission denied; "
                              "choose another with --run-dir") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"run directory {run_dir} is not writable; fix its permissions or choose "
                              "another with --run-dir")
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        if saved.get("job") != cfg["job"]:
            raise ValueError(f"run directory {run_dir} belongs to job '{saved.get('job')}', not '{cfg['job']}': "
                             "choose another --run-dir")
        if with_defaults({"model": saved.get("model") or {}})["model"] != cfg["model"]:
            raise ValueError(f"run directory {run_dir} was started with model {saved.get('model')}, this run asks "
                             f"for {cfg['model']}: its checkpoints would not fit; choose another --run-dir")
    if is_main_rank():
        for stale in run_dir.glob(f".{saved_path.name}.tmp-*"):  # left by a run killed while writing it
            stale.unlink(missing_ok=True)
        write_atomic(saved_path, dump(cfg).encode())


def clear_requeue_mark(run_dir: Path) -> None:
    """A run starting in run_dir has not stopped yet: a mark left by the previous one goes."""
    (Path(run_dir) / REQUEUE_MARK).unlink(missing_ok=True)


def mark_stopped_for_requeue(run_dir: Path, stage: str, step: int | None) -> None:
    """Record that the run stopped for requeue; step None: before `stage` started (after the stage
    before it completed). Call on rank 0 only, once the checkpoint is complete."""
    mark = {"stage": stage, "step": step}
    write_atomic(Path(run_dir) / REQUEUE_MARK, json.dumps(mark).encode())


def requeue_mark(run_dir: Path) -> dict | None:
    """The mark of a run stopped for requeue in run_dir, or None."""
    try:
        return json.loads((Path(run_dir) / REQUEUE_MARK).read_text())
    except (OSError, ValueError):  # absent, or not ours
        return None


def requeue_line(run_dir: Path, mark: dict) -> str:
    """The one line that ends a run stopped for requeue."""
    where = (f"checkpoint at step {mark['step']} ({mark['stage']})" if mark["step"] is not None
             else f"before the {mark['stage']} stage started")
    return f"stopped for requeue: {where} in {run_dir}; rerun the same command to resume"
