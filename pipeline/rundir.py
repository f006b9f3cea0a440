"""The run directory: one job's config, stages, checkpoints and TensorBoard events.

A run directory belongs to one job: starting another job (or another model) in it is refused, so
nothing saved there is overwritten by mistake.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from pipeline.checkpoint import write_atomic
from pipeline.config import dump, with_defaults


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
    if int(os.environ.get("RANK", "0")) == 0:
        for stale in run_dir.glob(f".{saved_path.name}.tmp-*"):  # left by a run killed while writing it
            stale.unlink(missing_ok=True)
        write_atomic(saved_path, dump(cfg).encode())
