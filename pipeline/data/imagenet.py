"""ImageNet-style datasets: which files make up a split, with their labels, and what is wrong.

Folder layout: <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG. Labels are the positions
of the class folders of train/ in sorted order, for both splits, so a val/ that lacks a class
still labels the others right. File lists (data.file_list for train, data.val_file_list for val)
hold `path label` lines, paths relative to root (or absolute), labels 0..C-1.

We list the files ourselves and hand DALI's reader the list (files=, labels=) rather than letting it
scan file_root: the two splits then share one label map, and an empty class folder or a foreign
val class is reported before training starts instead of shifting the labels.
"""
from __future__ import annotations

import os

from .errors import DataError

# File name endings of the formats DALI's image decoder reads, with Pillow's name of the format.
# Other files in class folders are not samples.
IMAGE_FORMATS = {".jpeg": "JPEG", ".jpg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                 ".webp": "WEBP", ".ppm": "PPM", ".pgm": "PPM", ".pbm": "PPM", ".jp2": "JPEG2000"}
IMAGE_EXTENSIONS = tuple(IMAGE_FORMATS)
LAYOUT_HINT = ("the ImageNet layout is <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG "
               "(or set data.file_list / data.val_file_list, or data.generate=true on an empty root)")
# torchvision's ImageNet class unpacks the official archives into that layout (val/ sorted into
# class folders by the devkit's labels), reading the devkit with scipy.
TORCHVISION_SETUP = ("import torchvision; [torchvision.datasets.ImageNet('{root}', split=s) "
                     "for s in ('train', 'val')]")


def layout_fix(root: str) -> str:
    """The layout, and how to make it from the official archives."""
    command = TORCHVISION_SETUP.format(root=os.path.normpath(root))
    return (f"{LAYOUT_HINT}. To make it from the official archives (image-net.org: ILSVRC2012_img_train.tar, "
            f"ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz) placed in data.root, with scipy installed: "
            f"python -c \"{command}\"")


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subfolders(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def class_names(root: str) -> tuple[list[str], list[str]]:
    """(sorted class folder names of root/train, problems)."""
    train_dir = os.path.join(root, "train")
    if not os.path.isdir(root):
        return [], [f"{root}: data.root not found; {layout_fix(root)}"]
    if not os.path.isdir(train_dir):
        return [], [f"{train_dir}: split folder missing; {layout_fix(root)}"]
    names = _subfolders(train_dir)
    return names, ([] if names else [f"{train_dir}: holds no class folders; {LAYOUT_HINT}"])


def scan_folder(root: str, split: str, classes: list[str]) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, problems) of root/<split>/<class>/*, labelled by position in `classes`."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        return [], [], [f"{split_dir}: split folder missing; {layout_fix(root)}"]
    files, labels, problems = [], [], []
    label_of = {name: i for i, name in enumerate(classes)}
    for name in _subfolders(split_dir):
        class_dir = os.path.join(split_dir, name)
        if name not in label_of:
            problems.append(f"{class_dir}: class '{name}' has no folder in train/, so it has no label; "
                            "remove it or add the class to train/")
            continue
        with os.scandir(class_dir) as entries:
            names = sorted(e.name for e in entries if is_image_name(e.name) and e.is_file())
        if not names:
            problems.append(f"{class_dir}: class folder holds no images; add them, or remove the class "
                            "from train/ and val/ (which renumbers the labels)")
        files += [os.path.join(class_dir, n) for n in names]
        labels += [label_of[name]] * len(names)
    if not files and not problems:
        problems.append(f"{split_dir}: holds no class folders; {LAYOUT_HINT}")
    return files, labels, problems


def ignored_files(root: str, split: str) -> list[str]:
    """Files in the class folders of root/<split> that are not samples (no image file name)."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        return []
    ignored = []
    for name in _subfolders(split_dir):
        with os.scandir(os.path.join(split_dir, name)) as entries:
            ignored += sorted(e.path for e in entries if not e.name.startswith(".") and not is_image_name(e.name))
    return ignored


def read_file_list(root: str, list_path: str, key: str) -> tuple[list[str], list[int], list[str]]:
    """(files, labels, problems) of a `path label` file list (paths relative to root)."""
    if not os.path.isfile(list_path):
        return [], [], [f"{list_path}: file list given as data.{key} not found"]
    files, labels, problems = [], [], []
    with open(list_path) as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or not fields[1].isdigit():
                problems.append(f"{list_path}:{number}: expected 'path label' with an integer label >= 0, "
                                f"got {line.strip()!r}")
                continue
            files.append(os.path.join(root, fields[0]))
            labels.append(int(fields[1]))
    if not files and not problems:
        problems.append(f"{list_path}: file list (data.{key}) holds no samples")
    return files, labels, problems


def _label_space(cfg: dict) -> tuple[list[str] | None, int, list[str]]:
    """(class folder names or None with file lists, number of classes, problems)."""
    if cfg["file_list"]:
        _, labels, problems = read_file_list(cfg["root"], cfg["file_list"], "file_list")
        return None, max(labels, default=-1) + 1, problems
    classes, problems = class_names(cfg["root"])
    return classes, len(classes), problems


def list_split(cfg: dict, split: str) -> tuple[list[str], list[int], int, list[str]]:
    """(files, labels, num_classes, problems) of a split, from the folders or the file lists."""
    classes, num_classes, problems = _label_space(cfg)
    if problems:
        return [], [], 0, problems
    key = "file_list" if split == "train" else "val_file_list"
    if cfg[key]:
        files, labels, problems = read_file_list(cfg["root"], cfg[key], key)
        if max(labels, default=0) >= num_classes:
            problems.append(f"{cfg[key]}: labels up to {max(labels)}, but the training classes are "
                            f"0..{num_classes - 1}")
    elif classes is None:
        files, labels, problems = [], [], ["data.file_list is set, so give data.val_file_list too"]
    else:
        files, labels, problems = scan_folder(cfg["root"], split, classes)
    return files, labels, num_classes, problems


def load_split(cfg: dict, split: str) -> tuple[list[str], list[int], int]:
    """(files, labels, num_classes) of a split; DataError listing every structural problem."""
    files, labels, num_classes, problems = list_split(cfg, split)
    if problems:
        raise DataError("ImageNet dataset problems:\n  " + "\n  ".join(problems))
    return files, labels, num_classes
