"""The run directory: one job's config, stages, checkpoints and TensorBoard events.

A run directory belongs to one job and one config: starting another job in it, or the same job with
other settings, is refused (naming the keys that differ), so nothing saved there is overwritten by
mistake and every stage in it was trained with the config it holds. Only RESUMABLE_KEYS may change;
the saved config then takes the new values. `check_run_dir` only reads; `record_config` writes
`config.yaml` once a stage has started, so a start that fails (no data) leaves nothing behind.

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
from pipeline.config import DEFAULTS, dump

CONFIG_NAME = "config.yaml"
# Paths to the same inputs, moved (data.root and the other path keys; not train.deepspeed_config,
# which picks the ZeRO stage), and when to stop, log, save and wait: none changes what is trained.
RESUMABLE_KEYS = ("data.root", "data.file_list", "data.val_file_list", "model.pretrained",
                  "train.stop_at_step", "train.progress", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.dist_timeout")

REQUEUE_MARK = "stopped-for-requeue.json"
REQUEUE_EXIT = 75  # EX_TEMPFAIL: checkpoint written on a signal; run again (the SLURM templates requeue)


def is_main_rank() -> bool:
    """Rank 0 of the launch, or a process started without a launcher."""
    return int(os.environ.get("RANK", "0")) == 0


def flatten(cfg: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}."""
    flat = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, cfg: dict) -> dict:
    """{dotted key: (saved value, new value)} for every key that differs. A key the saved config
    lacks (added to DEFAULTS since) counts at its default, which keeps what that run did."""
    old = {**flatten(DEFAULTS), **flatten(saved)}
    new = flatten(cfg)
    missing = "(no such key)"
    return {key: (old.get(key, missing), new.get(key, missing)) for key in sorted(old.keys() | new.keys())
            if old.get(key, missing) != new.get(key, missing)}


def read_saved_config(run_dir: Path) -> dict | None:
    path = run_dir / CONFIG_NAME
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None


def check_run_dir(run_dir: Path, cfg: dict) -> dict:
    """Refuse a run directory this run may not use; writes nothing. Returns the resumable keys that
    change ({key: (saved, new)}), which `record_config` will save."""
    _check_writable(run_dir)
    saved = read_saved_config(run_dir)
    if saved is None:
        return {}
    if saved.get("job") != cfg["job"]:
        raise ValueError(f"run directory {run_dir} belongs to job '{saved.get('job')}', not '{cfg['job']}': "
                         "choose another --run-dir")
    changes = config_changes(saved, cfg)
    refused = {key: change for key, change in changes.items() if key not in RESUMABLE_KEYS}
    if refused:
        raise ValueError(_refusal(run_dir, refused))
    return changes


def _refusal(run_dir: Path, refused: dict) -> str:
    lines = "\n".join(f"  {key}: {old!r} (saved) -> {new!r} (this run)" for key, (old, new) in refused.items())
    return (f"run directory {run_dir} was started with other settings; its {CONFIG_NAME} and checkpoints "
            f"hold these:\n{lines}\nRestore them (drop or fix the --set / job file), or start a new run with "
            f"another --run-dir. A resume may change only {', '.join(RESUMABLE_KEYS)}.")


def _check_writable(run_dir: Path) -> None:
    """The run directory, or the folder it will be made in, must be writable (nothing made yet)."""
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if existing == run_dir and not (run_dir.is_dir() and os.access(run_dir, os.W_OK | os.X_OK)):
        raise PermissionError(f"run directory {run_dir} is not a writable directory; fix its permissions or "
                              "choose another with --run-dir")
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise PermissionError(f"cannot create run directory {run_dir}: {existing} is not a writable directory; "
                              "choose another with --run-dir")


def record_config(run_dir: Path, cfg: dict) -> None:
    """Write `config.yaml` (atomically) once a stage has started; rank 0 only. Called again by a
    resume, it saves the resumable keys that changed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    saved_path = run_dir / CONFIG_NAME
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
