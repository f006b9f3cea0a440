"""The data section of a job: every key with its default, per-dataset constants, validation."""
from __future__ import annotations

from .errors import DataError

DATA_DEFAULTS = {
    "dataset": "cifar10",  # cifar10 | cifar100 | imagenet
    "root": None,  # folder holding the dataset in its standard layout (required)
    # generate: when true and `root` holds no dataset, ensure_generated() writes a small synthetic
    # one there in the dataset's own layout (CIFAR pickles or ImageNet JPEG folders).
    "generate": False,
    "generated_size": 100,  # generated training images per class
    "generated_val_size": 20,  # generated validation images per class
    "generated_classes": 0,  # 0: the dataset's own count (10 / 100; 10 for imagenet)
    "generated_image_px": 128,  # nominal side of generated ImageNet-layout JPEGs (sides vary +-25%)
    # ImageNet only: `path label` lines (paths relative to root, labels 0..C-1) instead of the
    # root/train/<wnid>/ and root/val/<wnid>/ folders.
    "file_list": None,
    "val_file_list": None,
    "batch_size": 128,  # per process
    "eval_batch_size": 256,  # per process
    "num_threads": 4,  # DALI CPU worker threads per process
    "prefetch": 2,  # DALI prefetch queue depth (batches)
    "device": "auto",  # auto (gpu when CUDA is available) | cpu | gpu
    "dtype": "float32",  # float32 | bfloat16: dtype of the image batches handed to the model
    "image_size": 224,  # ImageNet crop side; eval resizes the shorter side to image_size * 256/224
    # CIFAR only: > 0 makes the LAST `holdout` training images (data_batch_1..5 / train, in file
    # order) the "val" split, and training uses the rest; 0 uses the official test set as "val".
    "holdout": 0,
    # CIFAR only: batches made per DALI iteration (then handed out one by one); 0: as many as
    # hold about 1024 images. Fewer iterations, less of DALI's fixed per-iteration cost on the
    # thread that launches the training step. A resumed run must use the value it started with.
    "batches_per_run": 0,
    # Share of JPEG decoding given to the GPU's hardware decoder (A100/H100/H200; mixed decode).
    # All of it: the rest is decoded on the SMs the training step needs (docs/performance.md).
    "hw_decoder_load": 1.0,
    # Where a GPU pipeline decodes JPEGs: "mixed" (nvJPEG: the hardware decoder, hw_decoder_load)
    # or "cpu" (libjpeg-turbo on DALI's num_threads; the crop, resize and normalisation stay on
    # the GPU). "cpu" for a step captured as one CUDA graph (train.cuda_graph): the captured step
    # never leaves the GPU idle, and the hardware decoder's small per-image copies and kernels
    # then wait behind it, so training waits for the batch (docs/performance.md, "Data loading").
    "decode_device": "mixed",
}

DATASETS = ("cifar10", "cifar100", "imagenet")
SPLITS = ("train", "val")
READER = "Reader"  # the ImageNet pipeline's file reader, by which name the loader's DALI iterator finds it

# Per-channel mean and std of the training images, in 0..1 (the usual published values).
_MEAN_STD_01 = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# The same in 0..255 pixel units: the loader normalises with these.
MEAN_STD = {name: tuple(tuple(255 * v for v in values) for values in pair)
            for name, pair in _MEAN_STD_01.items()}


def resolve(data_cfg: dict) -> dict:
    """DATA_DEFAULTS updated with `data_cfg`, checked; raises DataError naming the bad key."""
    unknown = sorted(set(data_cfg) - set(DATA_DEFAULTS))
    if unknown:
        raise DataError(f"unknown data config key(s) {unknown}; known keys: {sorted(DATA_DEFAULTS)}")
    cfg = {**DATA_DEFAULTS, **data_cfg}
    if cfg["dataset"] not in DATASETS:
        raise DataError(f"data.dataset must be one of {DATASETS}, got {cfg['dataset']!r}")
    if not cfg["root"]:
        raise DataError("data.root is not set: point it at the dataset folder "
                        "(or at an empty folder together with data.generate=true)")
    for key in ("batch_size", "eval_batch_size", "num_threads", "prefetch", "image_size",
                "generated_size", "generated_val_size", "generated_image_px"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise DataError(f"data.{key} must be a positive integer, got {cfg[key]!r}")
    if not isinstance(cfg["holdout"], int) or cfg["holdout"] < 0:
        raise DataError(f"data.holdout must be an integer >= 0, got {cfg['holdout']!r}")
    if not isinstance(cfg["batches_per_run"], int) or cfg["batches_per_run"] < 0:
        raise DataError(f"data.batches_per_run must be an integer >= 0 (0: automatic), got {cfg['batches_per_run']!r}")
    if cfg["batches_per_run"] > 1 and cfg["dataset"] == "imagenet":
        raise DataError("data.batches_per_run applies to CIFAR only (ImageNet's file reader makes one "
                        "batch per DALI iteration); leave it at 0")
    if cfg["holdout"] and cfg["dataset"] == "imagenet":
        raise DataError("data.holdout applies to CIFAR only; for ImageNet give the held-out images "
                        "as data.val_file_list")
    if cfg["device"] not in ("auto", "cpu", "gpu"):
        raise DataError(f"data.device must be auto, cpu or gpu, got {cfg['device']!r}")
    if cfg["dtype"] not in ("float32", "bfloat16"):
        raise DataError(f"data.dtype must be float32 or bfloat16, got {cfg['dtype']!r}")
    if cfg["decode_device"] not in ("mixed", "cpu"):
        raise DataError(f"data.decode_device must be mixed (GPU decoding) or cpu, got {cfg['decode_device']!r}")
    if not 0.0 <= float(cfg["hw_decoder_load"]) <= 1.0:
        raise DataError(f"data.hw_decoder_load must be in [0, 1], got {cfg['hw_decoder_load']!r}")
    most = {"cifar10": 10, "cifar100": 100}.get(cfg["dataset"], 1000)  # labels must fit the dataset
    if not isinstance(cfg["generated_classes"], int) or not 0 <= cfg["generated_classes"] <= most:
        raise DataError(f"data.generated_classes must be 0 (the dataset's own count) up to {most}, "
                        f"got {cfg['generated_classes']!r}")
    if cfg["dataset"] != "imagenet" and (cfg["file_list"] or cfg["val_file_list"]):
        raise DataError("data.file_list / data.val_file_list apply to ImageNet only")
    return cfg


def num_generated_classes(cfg: dict) -> int:
    if cfg["generated_classes"]:
        return cfg["generated_classes"]
    return {"cifar10": 10, "cifar100": 100, "imagenet": 10}[cfg["dataset"]]
