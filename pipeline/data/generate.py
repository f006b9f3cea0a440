"""A small synthetic dataset written in the real datasets' layouts, for the demo, the tests and the bench.

Class c has a background colour (`class_colour`) and a shape (`SHAPES[c % len(SHAPES)]`) drawn in a
contrasting colour at a random place and size, plus per-image colour jitter and pixel noise: easy
to learn, but not a constant. Everything is seeded by (split, class, index), so every process and
every run writes the same bytes.

Layouts: CIFAR-10 `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta), CIFAR-100
`cifar-100-python/` (train, test, meta), ImageNet `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG`.
Each generated folder holds GENERATED.json with the parameters it was written with.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .defaults import num_generated_classes, resolve
from .errors import DataError

MARKER = "GENERATED.json"
SHAPES = ("disc", "square", "triangle", "diamond", "ring", "cross", "bar", "dot")
_SPLIT_CODE = {"train": 1, "val": 2}
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def class_colour(c: int, num_classes: int) -> np.ndarray:
    """Background RGB of class c: distinct points of a regular grid in the RGB cube."""
    levels = max(2, math.ceil(num_classes ** (1 / 3)))
    values = np.linspace(30, 225, levels)
    grid = np.stack(np.meshgrid(values, values, values, indexing="ij"), -1).reshape(-1, 3)
    order = np.random.default_rng(0).permutation(len(grid))
    return grid[order[c]]


def _shape_mask(shape: str, h: int, w: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    dy, dx = (yy + 0.5 - cy) / radius, (xx + 0.5 - cx) / radius
    if shape == "disc":
        return dx**2 + dy**2 <= 1
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.8
    if shape == "triangle":
        return (dy <= 0.8) & (abs(dx) <= (dy + 1) / 2)
    if shape == "diamond":
        return abs(dx) + abs(dy) <= 1
    if shape == "ring":
        return (dx**2 + dy**2 <= 1) & (dx**2 + dy**2 >= 0.35)
    if shape == "cross":
        return ((abs(dx) <= 0.3) & (abs(dy) <= 1)) | ((abs(dy) <= 0.3) & (abs(dx) <= 1))
    if shape == "bar":
        return (abs(dy) <= 0.35) & (abs(dx) <= 1)
    return dx**2 + dy**2 <= 0.2  # "dot"


def draw_image(split: str, c: int, index: int, num_classes: int, h: int, w: int) -> np.ndarray:
    """The generated image `index` of class c in `split`: uint8 (h, w, 3)."""
    rng = np.random.default_rng([_SPLIT_CODE[split], c, index])
    background = class_colour(c, num_classes) + rng.uniform(-10, 10, 3)
    foreground = (class_colour(c, num_classes) + 128) % 256
    radius = min(h, w) * rng.uniform(0.2, 0.3)
    cy, cx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65)
    image = np.tile(background, (h, w, 1))
    image[_shape_mask(SHAPES[c % len(SHAPES)], h, w, cy, cx, radius)] = foreground
    image += rng.normal(0, 6, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _params(cfg: dict) -> dict:
    params = {"dataset": cfg["dataset"], "classes": num_generated_classes(cfg),
              "train_per_class": cfg["generated_size"], "val_per_class": cfg["generated_val_size"]}
    if cfg["dataset"] == "imagenet":
        params["image_px"] = cfg["generated_image_px"]
    return params


def _samples(split: str, params: dict):
    """(class, index) pairs of a split in a fixed interleaved order, like the real files."""
    per_class = params["train_per_class" if split == "train" else "val_per_class"]
    pairs = [(c, i) for c in range(params["classes"]) for i in range(per_class)]
    order = np.random.default_rng(_SPLIT_CODE[split]).permutation(len(pairs))
    return [pairs[k] for k in order]


def _write_pickle(path: str, content: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(content, f, protocol=4)


def _write_cifar(folder: str, params: dict) -> None:
    """The official python layout: rows of 3072 uint8 (R plane, G plane, B plane)."""
    cifar100 = params["dataset"] == "cifar100"
    label_key = "fine_labels" if cifar100 else "labels"
    names = [f"class_{c:03d}" for c in range(params["classes"])]
    for split in ("train", "val"):
        samples = _samples(split, params)
        data = np.stack([draw_image(split, c, i, params["classes"], 32, 32).transpose(2, 0, 1).reshape(-1)
                         for c, i in samples])
        labels = [c for c, _ in samples]
        files = [f"gen_{split}_{c}_{i}.png" for c, i in samples]
        content = {"data": data, label_key: labels, "filenames": files}
        if cifar100:
            content["coarse_labels"] = [c // 5 for c in labels]
            _write_pickle(os.path.join(folder, "train" if split == "train" else "test"), content)
        elif split == "val":
            _write_pickle(os.path.join(folder, "test_batch"), {"batch_label": "testing batch 1 of 1", **content})
        else:
            for b, rows in enumerate(np.array_split(np.arange(len(samples)), 5)):
                _write_pickle(os.path.join(folder, f"data_batch_{b + 1}"),
                              {"batch_label": f"training batch {b + 1} of 5", "data": data[rows],
                               label_key: [labels[r] for r in rows], "filenames": [files[r] for r in rows]})
    meta = ({"fine_label_names": names, "coarse_label_names": names[::5]} if cifar100
            else {"label_names": names, "num_cases_per_batch": 0, "num_vis": 3072})
    _write_pickle(os.path.join(folder, "meta" if cifar100 else "batches.meta"), meta)


def _write_imagenet_split(folder: str, split: str, params: dict) -> None:
    # Threads: drawing (numpy) and JPEG encoding (Pillow) release the GIL, so the set is written
    # about as many times faster as there are cores.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for _ in pool.map(lambda sample: _write_jpeg(folder, split, params, *sample), _samples(split, params)):
            pass  # re-raises a worker's error


def _write_jpeg(folder: str, split: str, params: dict, c: int, i: int) -> None:
    from PIL import Image

    px = params["image_px"]
    rng = np.random.default_rng([_SPLIT_CODE[split], c, i, 7])
    h, w = (int(px * s) for s in rng.uniform(0.75, 1.25, 2))
    class_dir = os.path.join(folder, wnid(c))
    os.makedirs(class_dir, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(draw_image(split, c, i, params["classes"], h, w)).save(buffer, "JPEG", quality=90)
    with open(os.path.join(class_dir, f"gen_{c}_{i}.JPEG"), "wb") as f:
        f.write(buffer.getvalue())


def wnid(c: int) -> str:
    """Folder name of generated class c, shaped like an ImageNet WordNet id."""
    return f"n{c:08d}"


def _top_folders(dataset: str) -> list[str]:
    return [CIFAR_DIRS[dataset]] if dataset in CIFAR_DIRS else ["train", "val"]


def _read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_generated(data_cfg: dict) -> None:
    """If data.generate is true and data.root holds no dataset, write the generated one there.

    Safe when several processes call it at once: each writes into its own temporary folder under
    root and renames it into place; a folder that another process renamed first is kept (the
    content is identical, being seeded). A dataset already there is left alone: a real one, or a
    generated one with the same parameters. A generated one with other parameters raises DataError.
    """
    cfg = resolve(data_cfg)
    if not cfg["generate"]:
        return
    if cfg["file_list"] or cfg["val_file_list"]:
        raise DataError("data.generate writes the folder layout; unset data.file_list / "
                        "data.val_file_list or data.generate")
    root, params = cfg["root"], _params(cfg)
    tops = _top_folders(cfg["dataset"])
    present = [t for t in tops if os.path.isdir(os.path.join(root, t))]
    for top in present:
        marker = _read_marker(os.path.join(root, top))
        if marker is None and len(present) == len(tops):
            return  # a real (not generated) dataset: use it as it is
        if marker is None:
            raise DataError(f"{os.path.join(root, top)} exists but {set(tops) - set(present)} does not, "
                            "and it was not generated: complete the dataset, or unset data.generate")
        if marker != params:
            raise DataError(f"{os.path.join(root, top)} holds a generated dataset written with {marker}, "
                            f"not {params}: delete it or choose another data.root")
    missing = [t for t in tops if t not in present]
    if not missing:
        return
    os.makedirs(root, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".generating-", dir=root)
    try:
        for top in missing:
            folder = os.path.join(scratch, top)
            os.makedirs(folder)
            if cfg["dataset"] in CIFAR_DIRS:
                _write_cifar(folder, params)
            else:
                _write_imagenet_split(folder, top, params)
            with open(os.path.join(folder, MARKER), "w") as f:
                json.dump(params, f)
            try:
                os.rename(folder, os.path.join(root, top))
            except OSError:
                if not os.path.isdir(os.path.join(root, top)):
                    raise  # not "another process was first"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
