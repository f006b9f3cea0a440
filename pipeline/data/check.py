"""Preflight check of a job's dataset: every bad file, listed by path, before a run starts.
Its command, which reads the job file, is pipeline.check_data.

What counts as bad: a missing root, split or file; an empty class folder; a val class that train/
lacks; a malformed file list; an image that does not decode (corrupt, truncated, empty, not an
image); CIFAR files that are not CIFAR batches (not a pickle, wrong keys, wrong shape, labels out
of range).

Our choice for images that decode but are not what their name says: DALI's decoder reads the
content (output_type RGB), not the extension, so grayscale and CMYK JPEGs and a PNG (or other
format) named .JPEG train correctly; real ImageNet holds a few of each. They are accepted and
listed as notes (a non-JPEG under a .JPEG name, so it can be converted if wanted), as are files in
class folders whose names are not image names (not samples: the loader leaves them out).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from . import cifar, imagenet
from .defaults import resolve
from .errors import DataError

CHUNK = 10000  # images decoded per round of the thread pool


class Report(NamedTuple):
    problems: list[str]  # each "path: what is wrong; what to do"
    notes: list[str]  # usable, but worth knowing
    samples: int  # images found, all splits


def inspect_image(path: str) -> tuple[str | None, str | None]:
    """(problem, note) of one image file, decoding it fully."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            found = image.format
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))  # faster, still all data
            image.load()
    except FileNotFoundError:
        return f"{path}: file not found; restore it or remove it from the file list", None
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data
        return (f"{path}: does not decode ({type(err).__name__}: {err}); replace it with a good copy "
                "or remove it"), None
    extension = os.path.splitext(path)[1]
    if found != imagenet.IMAGE_FORMATS.get(extension.lower()):
        return None, f"{path}: {found} data named {extension}; DALI decodes it by its content"
    return None, None


def _check_cifar(cfg: dict) -> Report:
    files = cifar.split_files(cfg["dataset"], cfg["root"])
    folder = os.path.dirname(files["train"][0])
    if not os.path.isdir(folder):
        return Report([cifar.missing_folder_problem(cfg["dataset"], cfg["root"])], [], 0)
    problems, samples, train_samples = [], 0, 0
    for split, paths in files.items():
        for path in paths:
            try:
                count = len(cifar.read_batch_file(path, cfg["dataset"])[1])
            except DataError as err:
                problems.append(str(err))
                continue
            samples += count
            train_samples += count if split == "train" else 0
    if not problems and cfg["holdout"] >= train_samples:
        problems.append(f"data.holdout={cfg['holdout']} leaves none of the {train_samples} training images")
    return Report(problems, [], samples)


def _check_imagenet(cfg: dict, workers: int | None) -> Report:
    problems, files, notes = [], [], []
    for split in ("train", "val"):
        split_files, _, _, split_problems = imagenet.list_split(cfg, split)
        problems += [p for p in split_problems if p not in problems]
        files += split_files
        list_key = "file_list" if split == "train" else "val_file_list"
        if not cfg[list_key]:
            notes += [f"{path}: not an image file name, so not a sample" for path in
                      imagenet.ignored_files(cfg["root"], split)]
    with ThreadPoolExecutor(workers or os.cpu_count()) as pool:  # Pillow decodes without the GIL
        for start in range(0, len(files), CHUNK):  # bounded memory on millions of files
            for problem, note in pool.map(inspect_image, files[start:start + CHUNK]):
                problems += [problem] if problem else []
                notes += [note] if note else []
            if len(files) > CHUNK:
                print(f"checked {min(start + CHUNK, len(files))} of {len(files)} images", file=sys.stderr)
    return Report(problems, notes, len(files))


def check_dataset(data_cfg: dict, *, workers: int | None = None) -> Report:
    """Scan the dataset `data_cfg` describes (both splits), decoding every image file."""
    cfg = resolve(data_cfg)
    if cfg["dataset"] == "imagenet":
        return _check_imagenet(cfg, workers)
    return _check_cifar(cfg)


if __name__ == "__main__":  # the command moved up a level, where job files are read
    sys.exit("the dataset check is `python -m pipeline.check_data --job JOB`")
