"""Resumable checkpoints and the final export of a stage, both written atomically.

A checkpoint is written into `.tmp-step-N/` by every rank (accelerate's save_state for the
DeepSpeed engine, RNG and scheduler, plus each rank's data-loader position), then renamed to
`step-N/` by rank 0 once all ranks are done: a directory named `step-N` is always complete, and a
killed write leaves only a `.tmp-*` directory that is ignored and cleaned up. A write that fails
(disk full) or a checkpoint that does not fit the run raises CheckpointError, naming the path and
the fix. docs/reliability.md lists the faults this survives and the tests that check it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint or export that cannot be written or does not fit this run; the message says what to do."""


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` to `final`. An existing `final` is first renamed aside under a
    `.tmp-` name (ignored, cleaned up later), so no kill ever leaves a half-deleted `final`."""
    if final.exists():
        old = final.with_name(f"{tmp.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _write_failed(what: Path, err: Exception, resume_hint: str) -> CheckpointError:
    # torch.save reports a full disk as "unexpected pos ...": say how much room there is
    folder = what.parent
    while not folder.exists():
        folder = folder.parent
    free_mb = shutil.disk_usage(folder).free / 2 ** 20
    return CheckpointError(
        f"writing {what} failed: {_brief(err)}. {folder} has {free_mb:.1f} MiB free: if the disk is full "
        f"or not writable, free space or fix the permissions, then run the same command again: {resume_hint}")


def _brief(err: Exception) -> str:
    """The first two lines of an error (torch puts the detail of a state_dict mismatch on the second)."""
    return " ".join(line.strip() for line in str(err).strip().splitlines()[:2])[:400]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / "trainer.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def save_checkpoint(accelerator, ckpt_dir: Path, trainer_state: dict, loader, keep: int) -> Path:
    """Collective: every rank must call it (DeepSpeed saves its shards from every rank)."""
    step = trainer_state["step"]
    final = ckpt_dir / f"{PREFIX}{step:08d}"
    tmp = ckpt_dir / f".tmp-{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        with _writing(accelerator, ckpt_dir, tmp):
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
    accelerator.wait_for_everyone()
    with _writing(accelerator, ckpt_dir, tmp):
        accelerator.save_state(str(tmp))
        write_atomic(tmp / f"loader_rank{accelerator.process_index}.pkl", pickle.dumps(loader.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _writing(accelerator, ckpt_dir, tmp):
            write_atomic(tmp / "trainer.json", json.dumps(trainer_state, indent=1).encode())
        _replace_dir(tmp, final)
        prune(ckpt_dir, keep)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def _writing(accelerator, ckpt_dir: Path, tmp: Path):
    """Turn a failed write into a CheckpointError that says where the run will resume."""
    try:
        yield
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        latest = latest_checkpoint(ckpt_dir)
        error = _write_failed(tmp, err, f"it resumes from {latest}" if latest else "the stage starts over")
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        raise error from err


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and `.tmp-*` leftovers. A checkpoint is renamed
    to a `.tmp-` name first: a kill during the deletion leaves nothing that still looks complete."""
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        os.replace(old, old.with_name(f".tmp-{old.name}.old"))
    remove_leftovers(ckpt_dir)


def remove_leftovers(ckpt_dir: Path) -> None:
    """Remove `.tmp-step-*` folders: killed writes, checkpoints half deleted."""
    for tmp in ckpt_dir.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(accelerator, path: Path, loader) -> dict:
    """Restore engine, optimizer, scheduler, RNG and this rank's loader position."""
    written_by = len(list(path.glob("loader_rank*.pkl")))
    if written_by != accelerator.num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {written_by} process(es), this run has "
            f"{accelerator.num_processes}: resume with --num_processes {written_by}, or start the stage "
            "again in a new run directory (--run-dir)")
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run ({_brief(err)}): it was "
            f"written by another model or DeepSpeed config. Resume with the settings it was written with, "
            f"or move {path.parent} away to start the stage over, or use a new --run-dir") from err
    loader_file = path / f"loader_rank{accelerator.process_index}.pkl"
    with open(loader_file, "rb") as f:
        loader.load_state_dict(pickle.load(f))
    return json.loads((path / "trainer.json").read_text())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_final(stage_dir: Path, state_dict: dict, manifest: dict) -> Path:
    """Write `<stage>/final/` (weights + manifest) atomically; rank 0 only."""
    final = stage_dir / "final"
    tmp = stage_dir / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"arch": manifest["arch"]})
        manifest = dict(manifest, weights_sha256=file_sha256(tmp / "model.safetensors"))
        write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    except (OSError, SafetensorError) as err:
        error = _write_failed(tmp, err, "the stage resumes from its last checkpoint and exports again")
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from err
    remove_leftovers(stage_dir / "checkpoints")  # before `final` exists: a complete stage has none
    _replace_dir(tmp, final)
    return final


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / "final" / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_final_weights(stage_dir: Path, arch: str, num_classes: int) -> dict:
    """The exported weights of a completed stage, checked against the model they will load into."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise FileNotFoundError(f"{stage_dir}/final/manifest.json not found: the stage has not completed")
    got = (manifest["arch"], manifest["num_classes"])
    if got != (arch, num_classes):
        raise CheckpointError(
            f"{stage_dir}/final holds a {got[0]} with {got[1]} classes, but this job builds a {arch} "
            f"with {num_classes} classes: use a run directory of this job (--run-dir) or fix model.*")
    weights = stage_dir / "final" / "model.safetensors"
    if file_sha256(weights) != manifest["weights_sha256"]:
        raise CheckpointError(f"{weights} does not match the hash in its manifest: the file is corrupt; "
                              f"re-run the '{manifest['stage']}' stage in a new run directory")
    return load_file(str(weights))
