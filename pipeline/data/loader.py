"""build_loader: one DALI-backed loader per job, split and rank, with one output contract.

Iterating a Loader yields one epoch of (images, labels): images (B, 3, H, W) normalised, in
data.dtype, channels_last, on cuda:device_id or the CPU; labels int64 (B,), -1 on the padding of
the last val batches. Every batch is full. Train drops the remainder of its shard, val pads, so
every rank has len(loader) batches and no collective waits on a rank that has run out.

Sharding: shard_id = global rank, num_shards = world size, device_id = local rank (or None: CPU).
Train: each epoch a new permutation of the whole split, seeded by (seed, epoch) and the same on
every rank; rank r reads the r-th of num_shards disjoint slices. Val: rank r reads the r-th
contiguous slice in file order, so every sample is read exactly once.

Resume: state_dict() holds the epoch, the number of batches consumed in it and DALI's checkpoint
(readers' positions, random generators' states, the CIFAR source's epoch and iteration), taken
at the consumer's position, so batches DALI has prefetched but not handed out are produced again.
load_state_dict() rebuilds the pipeline from it: the rest of the epoch and every later epoch come
out bitwise as in a run that was never interrupted.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import cifar, imagenet
from .defaults import MEAN_STD, READER, resolve
from .errors import DataError

# CIFAR: batches per DALI iteration by default, so that one iteration holds about this many
# images. DALI's cost per iteration (scheduling, the source callback, the iterator's Python) is
# paid on the thread that launches the training step, so fewer, larger iterations pay it less
# often (docs/performance.md, "Data loading").
CIFAR_SAMPLES_PER_RUN = 1024

CHECK_HINT = "run `python -m pipeline.check_data --job JOB --set data.root={root}` to list every unreadable file"


def _shard_bounds(num_samples: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """[begin, end) of a contiguous shard, the split DALI's readers use."""
    return num_samples * shard_id // num_shards, num_samples * (shard_id + 1) // num_shards


class CifarSource:
    """The DALI external source of a CIFAR split: a pure function of (epoch, iteration).

    Train: permutation of all samples by (seed, epoch); this rank takes its slice of it and the
    first `batches` full batches. Val: this rank's contiguous slice, padded to `batches` full
    batches by repeating its last sample. Each DALI iteration takes `group` of these batches at
    once (fewer in the epoch's last), so DALI's fixed cost per iteration is shared by `group`.

    With a CUDA `device` the whole split (150 MB for CIFAR) is copied there once and every batch
    is gathered on the GPU, on a stream of its own (`stream`, which DALI also reads it on): no
    per-batch host gather, staging copy and upload on the thread that also launches the training
    step, and no wait for the training step queued before it."""

    def __init__(self, images, labels, train, batch_size, batches, shard_id, num_shards, seed, group=1,
                 device=None):
        self.train, self.device = train, device
        self.batch_size, self.batches, self.seed, self.group = batch_size, batches, seed, group
        self.shard_id, self.num_shards = shard_id, num_shards
        self.num_samples = len(labels)
        self.stream = None
        if device is not None:
            images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
            self.stream = torch.cuda.Stream(device)
            self.stream.wait_stream(torch.cuda.current_stream(device))  # the copies above
        self.images, self.labels = images, labels
        self._cache = (None, None)  # (epoch, its indices): one permutation per epoch, not per batch

    def indices(self, epoch: int):
        """This rank's sample indices of `epoch` in order (numpy, or a tensor on `device`)."""
        if self._cache[0] != epoch:
            order = self._indices(epoch)
            if self.device is not None:
                with torch.cuda.stream(self.stream):
                    order = torch.from_numpy(order).to(self.device)
            self._cache = (epoch, order)
        return self._cache[1]

    def _indices(self, epoch: int) -> np.ndarray:
        n = self.num_samples
        if self.train:
            per_shard = n // self.num_shards
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            return order[self.shard_id * per_shard:(self.shard_id + 1) * per_shard]
        begin, end = _shard_bounds(n, self.shard_id, self.num_shards)
        padded = np.arange(begin, begin + self.batches * self.batch_size)
        return np.minimum(padded, end - 1)

    def __call__(self, info):
        first = info.iteration * self.group  # the first batch of this DALI iteration
        if first >= self.batches:
            raise StopIteration
        count = min(self.group, self.batches - first) * self.batch_size
        picked = self.indices(info.epoch_idx)[first * self.batch_size:][:count]
        with torch.cuda.stream(self.stream):  # no stream (CPU): a no-op
            return self.images[picked], self.labels[picked]


class Loader:
    """See the module docstring. Attributes: num_classes, num_samples (in the split, all ranks),
    mean and std (3-tuples, 0..255 pixel units), epoch (epochs completed), batch_size.

    Each DALI iteration produces `group` batches (CIFAR; 1 for ImageNet), handed out one by one."""

    def __init__(self, make_pipeline, *, batches, real_in_shard, num_classes, num_samples, batch_size,
                 mean, std, dtype, device, layout, reader, root, group=1):
        self._make_pipeline, self._reader, self._group = make_pipeline, reader, group
        self._pending = []  # batches of the current DALI iteration not handed out yet
        self._group_checkpoint = None  # DALI's state before the current iteration (state_dict mid-way)
        self._check_hint = CHECK_HINT.format(root=root)
        self._batches = batches
        self._real_in_shard = real_in_shard  # val: samples of this rank before the padding; train: None
        self.num_classes, self.num_samples, self.batch_size = num_classes, num_samples, batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.dtype, self.device = dtype, device
        self._layout = layout  # what a state_dict must match to be loaded here
        self.epoch = 0
        self._position = 0  # batches of the current epoch handed out
        self._run = 0  # bumped whenever an open epoch generator must stop
        self._iterator = self._build_iterator(None)

    def __len__(self) -> int:
        return self._batches

    def _build_iterator(self, checkpoint):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = self._make_pipeline(checkpoint)
        if self.device.type == "cuda":
            _outputs_on_current_stream(pipe, self.device)
        policy = LastBatchPolicy.FILL if self._real_in_shard is not None else LastBatchPolicy.DROP
        try:
            iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name=self._reader,
                                           auto_reset=True, last_batch_policy=policy)
        except RuntimeError as err:
            if checkpoint is not None and "checkpoint" in str(err).lower():
                raise DataError(f"the loader state being restored does not fit this data pipeline ({_dali_cause(err)}): "
                                "it was saved by other loader code or settings; resume with the code that saved "
                                "it, or start the stage afresh") from err
            raise DataError(f"DALI could not produce the first batch: {_dali_cause(err)}; "
                            f"{self._check_hint}") from err
        if self._reader and len(iterator) != self._batches:
            raise RuntimeError(f"DALI counts {len(iterator)} batches per epoch, the loader {self._batches}")
        return iterator

    def _next_outputs(self):
        try:
            return next(self._iterator)[0]
        except RuntimeError as err:
            raise DataError(f"DALI failed on a batch of epoch {self.epoch}: {_dali_cause(err)}; "
                            f"{self._check_hint}") from err

    def _next_group(self) -> list:
        """The batches of DALI's next iteration, as (images, labels) views of its outputs."""
        if self._group > 1:
            self._group_checkpoint = self._iterator.checkpoints()[0]
        outputs = self._next_outputs()
        # DALI's HWC batch viewed as NCHW is channels_last already; .to() keeps the layout, and
        # slices along the batch stay channels_last.
        images = outputs["images"].permute(0, 3, 1, 2).to(self.dtype)
        labels = outputs["labels"].reshape(-1).long()
        batches = list(zip(images.split(self.batch_size), labels.split(self.batch_size)))
        # Iterations start at multiples of group in the epoch; a position between them is a restore
        # mid-iteration, whose first batches were handed out before the checkpoint.
        return batches[self._position % self._group:]

    def __iter__(self):
        self._run += 1  # an earlier generator of this loader stops where it is
        return self._epoch(self._run)

    def _epoch(self, run):
        while run == self._run and self._position < self._batches:
            if not self._pending:
                self._pending = self._next_group()
            images, labels = self._pending.pop(0)
            self._position += 1
            yield images, self._mark_padding(labels, self._position - 1)
        if run == self._run:
            self._finish_epoch()

    def _finish_epoch(self):
        """After the last batch: let DALI's iterator end its epoch and reset, then count it."""
        try:
            self._next_outputs()
        except StopIteration:
            pass
        else:
            raise RuntimeError("DALI produced more batches than the loader counted")
        if self._pending:
            raise RuntimeError(f"DALI's last iteration held {len(self._pending)} batches more than the loader counted")
        self.epoch += 1
        self._position = 0
        self._run += 1

    def _mark_padding(self, labels, batch_index):
        """Val: label -1 the padding after this rank's last sample."""
        if self._real_in_shard is not None:
            first = batch_index * self.batch_size
            position = torch.arange(first, first + self.batch_size, device=labels.device)
            labels = torch.where(position < self._real_in_shard, labels, -1)
        return labels  # on self.device already: the pipeline's outputs are

    def state_dict(self) -> dict:
        """Position and random state; call it between batches. At the end of an epoch it describes
        the start of the next one."""
        if self._position == self._batches:
            self._finish_epoch()
        # Mid-way through a DALI iteration: its state before that iteration; a restore makes the
        # iteration again and drops the batches handed out already (position % group of them).
        checkpoint = self._group_checkpoint if self._pending else self._iterator.checkpoints()[0]
        return {"epoch": self.epoch, "position": self._position, "dali": checkpoint, **self._layout}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next iteration yields the batches that were still to come."""
        saved = {"batches_per_run": 1, **state}  # states saved before batches_per_run existed
        mismatched = {k: (saved.get(k), v) for k, v in self._layout.items() if saved.get(k) != v}
        if mismatched:
            raise DataError("loader state was saved with a different data layout "
                            f"(key: (saved, now)) {mismatched}; resume with the same dataset, batch "
                            "size, batches_per_run, seed and number of processes, or start the stage afresh")
        self._iterator = self._build_iterator(state["dali"])
        self.epoch, self._position = state["epoch"], state["position"]
        self._pending = []
        self._run += 1


def _outputs_on_current_stream(pipe, device: torch.device) -> None:
    """Make DALI's iterator take `pipe`'s outputs ordered on torch's current stream.

    DALIGenericIterator calls pipe.share_outputs() without a stream, which makes the host wait
    until each iteration's outputs are ready on the GPU: a wait per iteration on the thread that
    launches the training step. Bound to the current stream (DALI's default executor), the wait
    is queued on the GPU instead, and the zero-copy torch tensors the iterator makes from them
    are ordered after DALI's work as before."""
    share = pipe.share_outputs
    pipe.share_outputs = lambda cuda_stream=None: share(cuda_stream or torch.cuda.current_stream(device))


def _dali_cause(err: Exception) -> str:
    """The cause out of DALI's long error text (which follows its line 'encountered:')."""
    text = str(err).split("encountered:", 1)[-1]
    noise = ("C++ context", "Current pipeline", "Critical error")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith(noise)]
    return "; ".join(lines) or type(err).__name__


def _pipeline_seed(seed: int, shard_id: int) -> int:
    """Different augmentation on every rank, reproducible from the job seed."""
    return int(np.random.SeedSequence([seed, shard_id]).generate_state(1)[0] >> 1)


def build_loader(data_cfg: dict, split: str, *, shard_id: int = 0, num_shards: int = 1,
                 device_id: int | None = None, seed: int = 0) -> Loader:
    """The loader of `split` ("train" | "val") for rank shard_id of num_shards (see module doc).

    device_id None, or data.device == "cpu", runs CPU pipelines and returns CPU tensors. Problems
    with the dataset that can be seen without decoding every image raise DataError here."""
    cfg = resolve(data_cfg)
    if split not in ("train", "val"):
        raise DataError(f"split must be 'train' or 'val', got {split!r}")
    if not 0 <= shard_id < num_shards:
        raise DataError(f"shard_id {shard_id} is not in 0..num_shards-1 (num_shards={num_shards})")
    gpu = _use_gpu(cfg["device"], device_id)
    train = split == "train"
    batch_size = cfg["batch_size"] if train else cfg["eval_batch_size"]
    mean, std = MEAN_STD[cfg["dataset"]]
    group = 1 if cfg["dataset"] == "imagenet" else cfg["batches_per_run"] or max(1, CIFAR_SAMPLES_PER_RUN // batch_size)
    settings = {"batch_size": batch_size * group, "num_threads": cfg["num_threads"],
                "device_id": device_id if gpu else None, "seed": _pipeline_seed(seed, shard_id),
                "prefetch_queue_depth": cfg["prefetch"]}
    if cfg["dataset"] == "imagenet":
        files, labels, num_classes = imagenet.load_split(cfg, split)
    else:
        images, labels = cifar.load_split(cfg["dataset"], cfg["root"], split, cfg["holdout"])
        num_classes = cifar.LAYOUT[cfg["dataset"]][4]
    batches, real_in_shard = _epoch_size(len(labels), batch_size, shard_id, num_shards, train, split)

    if cfg["dataset"] == "imagenet":
        if train:  # DALI's epoch shuffles use a fixed seed: a seeded start order varies them by job seed
            order = np.random.default_rng(seed).permutation(len(files))
            files, labels = [files[i] for i in order], [labels[i] for i in order]

        def make_pipeline(checkpoint):
            from .pipelines import imagenet_pipeline
            return imagenet_pipeline(files, labels, shard_id, num_shards, train, gpu, cfg["image_size"],
                                     cfg["decode_device"], cfg["hw_decoder_load"], mean, std,
                                     checkpoint=checkpoint, **settings)
        reader = READER
    else:
        source = CifarSource(images, labels, train, batch_size, batches, shard_id, num_shards, seed, group,
                             device=torch.device("cuda", device_id) if gpu else None)

        def make_pipeline(checkpoint):
            from .pipelines import cifar_pipeline
            return cifar_pipeline(source, train, gpu, mean, std, checkpoint=checkpoint, **settings)
        reader = None

    layout = {"dataset": cfg["dataset"], "split": split, "num_samples": len(labels), "batch_size": batch_size,
              "shard_id": shard_id, "num_shards": num_shards, "seed": seed, "batches_per_run": group}
    return Loader(make_pipeline, batches=batches, real_in_shard=real_in_shard, num_classes=num_classes,
                  num_samples=len(labels), batch_size=batch_size, mean=mean, std=std,
                  dtype=torch.bfloat16 if cfg["dtype"] == "bfloat16" else torch.float32,
                  device=torch.device("cuda", device_id) if gpu else torch.device("cpu"),
                  layout=layout, reader=reader, root=cfg["root"], group=group)


def _use_gpu(device: str, device_id: int | None) -> bool:
    if device == "cpu" or (device == "auto" and (device_id is None or not torch.cuda.is_available())):
        return False
    if device_id is None:
        raise DataError("data.device is 'gpu' but no device_id was given: pass the local rank, "
                        "or set data.device=auto")
    if not torch.cuda.is_available():
        raise DataError("data.device is 'gpu' but CUDA is not available here: set data.device=auto or cpu")
    return True


def _epoch_size(num_samples, batch_size, shard_id, num_shards, train, split) -> tuple[int, int | None]:
    """(batches per epoch, same on every rank; real samples of this rank's val shard or None)."""
    if train:
        batches = num_samples // num_shards // batch_size
        if batches == 0:
            raise DataError(f"the {split} split has {num_samples} samples: fewer than num_shards x "
                            f"batch_size = {num_shards} x {batch_size}, so no full batch; lower data.batch_size")
        return batches, None
    if num_samples < num_shards:
        raise DataError(f"the {split} split has {num_samples} samples, fewer than the {num_shards} processes")
    begin, end = _shard_bounds(num_samples, shard_id, num_shards)
    return math.ceil(math.ceil(num_samples / num_shards) / batch_size), end - begin
