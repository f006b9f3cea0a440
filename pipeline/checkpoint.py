"""Resumable checkpoints and the final export of a stage, both written atomically.

A checkpoint is written into `.tmp-step-N/` by every rank (accelerate's save_state for the
DeepSpeed engine, RNG and scheduler, plus each rank's data-loader position), then renamed to
`step-N/` by rank 0 once all ranks are done: a directory named `step-N` is always complete, and a
killed write leaves only a `.tmp-*` directory that is ignored and cleaned up.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


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
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    rank = accelerator.process_index
    write_atomic(tmp / f"loader_rank{rank}.pkl", pickle.dumps(loader.state_dict()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_atomic(tmp / "trainer.json", json.dumps(trainer_state, indent=1).encode())
        if final.exists():  # a re-run of the same step: replace it only now that the new one is whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        prune(ckpt_dir, keep)
    accelerator.wait_for_everyone()
    return final


def prune(ckpt_dir: Path, keep: int) -> None:
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_dir.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(accelerator, path: Path, loader) -> dict:
    """Restore engine, optimizer, scheduler, RNG and this rank's loader position."""
    accelerator.load_state(str(path))
    rank = accelerator.process_index
    loader_file = path / f"loader_rank{rank}.pkl"
    if not loader_file.is_file():
        raise RuntimeError(
            f"checkpoint {path} has no data-loader state for rank {rank}: it was written with a "
            "different number of processes. Resume with the same world size, or start the stage "
            "again in a new run directory.")
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
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"arch": manifest["arch"]})
    manifest = dict(manifest, weights_sha256=file_sha256(tmp / "model.safetensors"))
    write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(stage_dir)
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
        raise ValueError(
            f"{stage_dir}/final holds a {got[0]} with {got[1]} classes, but this job builds a {arch} "
            f"with {num_classes} classes: use a run directory of this job (--run-dir) or fix model.*")
    weights = stage_dir / "final" / "model.safetensors"
    if file_sha256(weights) != manifest["weights_sha256"]:
        raise ValueError(f"{weights} does not match the hash in its manifest: the file is corrupt; "
                         f"re-run the '{manifest['stage']}' stage in a new run directory")
    return load_file(str(weights))
