"""Process-group setup: one code path for a laptop, one GPU, and many GPUs over many nodes.

The model always trains as a DeepSpeed engine prepared by accelerate. accelerate silently falls
back to one process or plain DDP in some launches, so `make_accelerator` asserts the world size
and the engine type it got.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import warnings
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_env() -> None:
    """Give a plain single-process start (`python pipeline/train.py`, or `accelerate launch` with
    its default single-process launcher) the rendezvous variables DeepSpeed needs, and take
    ranks from SLURM when srun started us directly."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ \
            and int(os.environ["SLURM_NTASKS"]) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def deepspeed_config(cfg: dict, on_gpu: bool) -> dict:
    """The job's DeepSpeed JSON with the batch sizes and precision filled in from the job.

    A DALI iterator is not a DataLoader, so DeepSpeed cannot infer "auto" batch sizes."""
    path = Path(cfg["train"]["deepspeed_config"])
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(
            f"DeepSpeed config '{path}' not found: set train.deepspeed_config to one of "
            f"{', '.join(sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / 'jobs/deepspeed').glob('*.json')))}")
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg["data"]["batch_size"]
    ds["gradient_accumulation_steps"] = 1
    ds.pop("train_batch_size", None)
    ds["zero_allow_untested_optimizer"] = True  # we hand DeepSpeed a torch SGD
    ds.pop("bf16", None), ds.pop("fp16", None)  # bf16 through torch_autocast only: BN stays fp32
    ds["torch_autocast"] = {"enabled": use_bf16(cfg, on_gpu), "dtype": "bfloat16"}
    # DeepSpeed's throughput timer synchronises the device at every forward and every step when
    # it was handed no DataLoader (ours is DALI's iterator), so the host could never queue a step
    # ahead of the GPU. Off unless the job's JSON sets "timers" itself.
    ds.setdefault("timers", {"throughput": {"enabled": False}})
    return ds


def use_bf16(cfg: dict, on_gpu: bool) -> bool:
    precision = cfg["train"]["precision"]
    return precision == "bf16" or (precision == "auto" and on_gpu)


def _drop_launcher_deepspeed_settings() -> None:
    """The job's DeepSpeed JSON is the one source of ZeRO stage and precision. accelerate refuses a
    JSON config when its launcher also passed DeepSpeed fields, so those are dropped (and named)."""
    fields = [f for f in os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", "").split(",") if f]
    for key in [k for k in os.environ if k.startswith("ACCELERATE_DEEPSPEED_")]:
        del os.environ[key]
    ignored = [f for f in fields if f not in ("deepspeed_multinode_launcher", "mixed_precision")]
    if ignored and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: accelerate config DeepSpeed fields {ignored} are ignored; ZeRO stage and precision "
              "come from the job's train.deepspeed_config and train.precision", flush=True)


def _not_untested_optimizer_warning(record: logging.LogRecord) -> bool:
    return "ZeRO with an untested optimizer" not in record.getMessage()


def silence_library_warnings_we_cannot_fix() -> None:
    """Two warnings at every launch whose causes lie in the pinned libraries, not in this code:
    - DeepSpeed's ZeRO-1/2 warn for any optimizer outside their list of Adam variants even when the
      config allows it (zero_allow_untested_optimizer, set above): ours is the torch SGD, whose state
      they partition like any other; the resume tests check it bitwise.
    - DeepSpeed 0.19's ZeRO-1/2 gather their partitions through torch.distributed.all_gather_into_tensor,
      which torch 2.14 deprecates for all_gather_single, the same call.
    Each filter matches that one message only."""
    from deepspeed.utils import logger as deepspeed_logger
    deepspeed_logger.addFilter(_not_untested_optimizer_warning)  # once: the same function is not added twice
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def make_accelerator(cfg: dict, project_dir: str):
    """An Accelerator whose model will be a DeepSpeed engine; asserts what it got."""
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    class _Plugin(DeepSpeedPlugin):
        # accelerate 1.15 registers the config with transformers' HfDeepSpeedConfig even when
        # transformers is not installed (PackageNotFoundError). That hook only serves
        # transformers' ZeRO-3 init, which we do not use.
        def set_deepspeed_weakref(self):
            try:
                import transformers  # noqa: F401
            except ImportError:
                return
            super().set_deepspeed_weakref()

    ensure_process_env()
    _drop_launcher_deepspeed_settings()
    silence_library_warnings_we_cannot_fix()
    on_gpu = torch.cuda.is_available()
    timeout = datetime.timedelta(seconds=cfg["train"]["dist_timeout"])
    pg_kwargs = InitProcessGroupKwargs(backend="nccl" if on_gpu else "gloo", timeout=timeout)
    plugin = _Plugin(hf_ds_config=deepspeed_config(cfg, on_gpu))
    # step_scheduler_with_optimizer=False: the schedule is per rank's step (pipeline.schedule), while
    # accelerate's default steps the scheduler once per process at every step.
    accelerator = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[pg_kwargs],
                              project_dir=project_dir, step_scheduler_with_optimizer=False)
    expected_world = int(os.environ["WORLD_SIZE"])
    if accelerator.num_processes != expected_world:
        raise RuntimeError(
            f"accelerate started {accelerator.num_processes} process(es) but WORLD_SIZE={expected_world}: "
            "check the launcher flags (accelerate launch --num_processes N with a DeepSpeed config; "
            "'--cpu --num_processes 2' starts one process)")
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise RuntimeError(f"expected a DeepSpeed run, accelerate chose {accelerator.distributed_type}")
    return accelerator
