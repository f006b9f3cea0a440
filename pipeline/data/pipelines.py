"""The DALI pipelines: one for CIFAR (raw uint8 arrays), one for ImageNet-style JPEG files.

Both output `images` as normalised float32 HWC batches (the torch side views them as NCHW in
channels_last memory format, without a copy) and `labels`. With `gpu` the augmentation runs on
the GPU (ImageNet: JPEG decoding too, with device="mixed", unless decode_device is "cpu");
without, CPU operators only, which is all DALI can run on a machine without CUDA (a pipeline
there must also have device_id=None).
Checkpointing is on, so the loader can save and restore the readers' positions and the random
operators' states.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from .defaults import READER

CIFAR_PAD = 4  # random crop 32 from the image zero-padded by 4 pixels on each side


def _normalise(images, mean, std, mirror, crop=None):
    return fn.crop_mirror_normalize(images, crop=crop, mirror=mirror, mean=list(mean), std=list(std),
                                    dtype=types.FLOAT, output_layout="HWC")


@pipeline_def(enable_checkpointing=True)
def cifar_pipeline(source, train: bool, gpu: bool, mean, std):
    """`source(batch_info)` returns (uint8 (B, 32, 32, 3), int64 (B,)), on the GPU with `gpu`, and
    ends the epoch with StopIteration. DALI checkpoints such a source by its (epoch, iteration),
    which the source turns into the same samples again: this is what makes a restored CIFAR
    pipeline exact."""
    # On the GPU, DALI copies the source's batch on the stream it was gathered on (source.stream):
    # ordered after that gather, and not after the training step queued on the current stream.
    images, labels = fn.external_source(source=source, num_outputs=2, batch=True, batch_info=True,
                                        layout=["HWC", ""], device="gpu" if gpu else "cpu",
                                        cuda_stream=source.stream if gpu else None)
    mirror = None
    if train:
        # torchvision's RandomCrop(32, padding=4): a window shifted by -4..4 pixels per axis,
        # zeros outside the image (before normalisation, as there).
        offset = fn.random.uniform(values=list(range(2 * CIFAR_PAD + 1)), shape=2, dtype=types.INT32)
        images = fn.slice(images, start=offset - CIFAR_PAD, shape=[32, 32], axes=[0, 1],
                          out_of_bounds_policy="pad", fill_values=0)
        mirror = fn.random.coin_flip(probability=0.5)
    return _normalise(images, mean, std, mirror), labels


@pipeline_def(enable_checkpointing=True)
def imagenet_pipeline(files, labels, shard_id: int, num_shards: int, train: bool, gpu: bool,
                      image_size: int, decode_device: str, hw_decoder_load: float, mean, std):
    """Train: decode a random crop (area 8-100 %, aspect 3/4-4/3), resize to image_size, flip.
    Val: decode, resize the shorter side to image_size * 256/224, centre crop image_size.
    With `gpu`, JPEGs are decoded on the GPU (decode_device "mixed") or on the CPU ("cpu"), and
    everything after the decoding runs on the GPU.

    Train shards: shuffle_after_epoch draws a new permutation of the whole list each epoch (the
    same on every rank) and rank r reads its r-th slice, so ranks never overlap. Val: fixed shards,
    each read in order; the last batch is padded by repeating the shard's last sample (the loader
    labels those -1)."""
    jpegs, labels = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                    shuffle_after_epoch=train, stick_to_shard=not train, pad_last_batch=True,
                                    name=READER)
    decode = {"device": "cpu", "output_type": types.RGB}
    if gpu:
        labels = labels.gpu()
    if gpu and decode_device == "mixed":
        # Larger nvJPEG buffers avoid re-allocations on big images (NVIDIA's ResNet-50 example values).
        decode = {"device": "mixed", "output_type": types.RGB, "hw_decoder_load": hw_decoder_load,
                  "device_memory_padding": 211025920, "host_memory_padding": 140544512}
    if train:
        images = fn.decoders.image_random_crop(jpegs, random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4 / 3],
                                               num_attempts=100, **decode)
        images = fn.resize(_on_gpu(images, gpu), resize_x=image_size, resize_y=image_size)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = fn.decoders.image(jpegs, **decode)
        images = fn.resize(_on_gpu(images, gpu), resize_shorter=round(image_size * 256 / 224))
        mirror = None
    return _normalise(images, mean, std, mirror, crop=(image_size, image_size)), labels


def _on_gpu(images, gpu: bool):
    """Decoded on the CPU, images go to the GPU for the rest (a no-op after mixed decoding)."""
    return images.gpu() if gpu else images
