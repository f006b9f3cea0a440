"""CIFAR-10/100 in the official python layout: reading and checking the pickled batches.

    <root>/cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch   (key 'labels')
    <root>/cifar-100-python/train, test                                  (key 'fine_labels')

Each file is a pickle (load with encoding="latin1") of a dict whose 'data' is an (N, 3072) uint8
array, one row per image: the 1024 red values, then green, then blue, each row-major 32 x 32.
Pickles can run code when loaded: read only files from a source you trust.

Splits: "train" is all training files in file order; "val" is the official test file. With
data.holdout = H > 0, "val" is instead the LAST H images of the training files (in file order) and
"train" the others, so hyper-parameters can be chosen without touching the test set.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from .errors import DataError

LAYOUT = {
    # dataset: (folder, training files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}


TORCHVISION_CLASS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}  # downloads the official python layout


def missing_folder_problem(dataset: str, root: str) -> str:
    """What is wrong when root lacks the dataset's folder, and the command that downloads it there."""
    folder = LAYOUT[dataset][0]
    root = os.path.normpath(root)
    if os.path.basename(root) == folder:  # data.root named the layout's own folder
        return (f"{os.path.join(root, folder)}: not found; data.root is the {folder}/ folder itself: "
                f"set data.root={os.path.dirname(root) or '.'}, the folder that holds it")
    download = f"import torchvision; torchvision.datasets.{TORCHVISION_CLASS[dataset]}('{root}', download=True)"
    return (f"{os.path.join(root, folder)}: not found; data.root must be the folder that holds {folder}/ "
            f"(the official {dataset} python layout). To download it there: python -c \"{download}\"")


def split_files(dataset: str, root: str) -> dict[str, list[str]]:
    """{"train": [paths], "test": [paths]} of the official layout under root."""
    folder, train, test, _, _ = LAYOUT[dataset]
    base = os.path.join(root, folder)
    return {"train": [os.path.join(base, f) for f in train], "test": [os.path.join(base, f) for f in test]}


def read_batch_file(path: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (images (N, 32, 32, 3) uint8 HWC, labels (N,) int64); DataError if bad."""
    _, _, _, label_key, num_classes = LAYOUT[dataset]
    fix = f"replace it with the file of that name from the official {dataset} python download"
    if not os.path.isfile(path):
        raise DataError(f"{path}: missing; the {dataset} python layout needs it ({fix})")
    try:
        with open(path, "rb") as f:
            content = pickle.load(f, encoding="latin1")
    except Exception as err:  # a pickle of anything can raise anything
        raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err}); {fix}") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: holds a {type(content).__name__}, not a CIFAR batch dict; {fix}")
    content = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in content.items()}
    if "data" not in content or label_key not in content:
        raise DataError(f"{path}: keys {sorted(map(str, content))} lack 'data' and '{label_key}', "
                        f"so this is not a {dataset} batch; {fix}")
    data = content["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' is {dtype} of shape {shape}, not (N, 3072) uint8 "
                        f"(32 x 32 RGB planes); {fix}")
    labels = np.asarray(content[label_key])
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: '{label_key}' has shape {labels.shape} ({labels.dtype}), not {len(data)} "
                        f"integer labels; {fix}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1} "
                        f"of {dataset}; {fix}")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _read_all(paths: list[str], dataset: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [read_batch_file(p, dataset) for p in paths]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_split(dataset: str, root: str, split: str, holdout: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) of split "train" or "val" (see module doc)."""
    folder = os.path.join(root, LAYOUT[dataset][0])
    if not os.path.isdir(folder):
        raise DataError(f"{missing_folder_problem(dataset, root)}; or set data.generate=true to write a "
                        "generated dataset there")
    files = split_files(dataset, root)
    if split == "val" and not holdout:
        return _read_all(files["test"], dataset)
    images, labels = _read_all(files["train"], dataset)
    if holdout >= len(labels):
        raise DataError(f"data.holdout={holdout} leaves no training images ({len(labels)} in {folder}); "
                        "choose a smaller holdout")
    if not holdout:
        return images, labels
    cut = len(labels) - holdout
    return (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])
