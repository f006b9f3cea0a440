"""Job configuration: defaults, YAML job files, dotted `--set` overrides, validation.

A job file holds a subset of DEFAULTS; `--set key.sub=value` overrides one leaf. Unknown keys and
values of the wrong type are refused with the key's name, so a typo never trains silently.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml

from pipeline.data.defaults import DATA_DEFAULTS

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
DEFAULT_JOB = JOBS_DIR / "demo.yaml"


class ConfigError(ValueError):
    """A job file or override that cannot be used; the message names the key and the fix."""


DEFAULTS = {
    "job": "unnamed",  # the job's name; a run directory belongs to one job
    "seed": 0,
    "model": {
        "arch": "resnet110",
        "num_classes": 10,
        "gamma": 0.5,  # float in [0, 1] or "auto"
        "r": 2,
        "d": 256,
        "tau": 1.0,
        # Gates in training: false = the paper's soft Gumbel-softmax relaxation; true = hard 0/1
        # decisions forward (straight-through gradients), so training runs the paths eval runs.
        "straight_through": False,
        # none = the paper's router; batch = a BatchNorm before each of its ReLUs (docs/method.md)
        "router_norm": "none",
        "pretrained": None,  # path to torchvision ResNet weights for the blocks (ImageNet nets)
    },
    "data": copy.deepcopy(DATA_DEFAULTS),
    "optim": {
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "nesterov": False,
        "reference_batch": 256,  # lr scales linearly with global batch / reference_batch (0: off)
        "warmup_epochs": 0.0,  # linear lr warm-up at the start of each stage
        "lr_decay": 0.1,
    },
    "stages": {
        # USW warm-up (eq. 14). epochs 0 disables it: joint then starts from scratch.
        "warmup": {"epochs": 30, "milestones": []},
        # mode "joint": routers + L_cost + alpha L_rank (eq. 16); "full": the static ResNet baseline.
        "joint": {"epochs": 320, "milestones": [250, 300], "mode": "joint",
                  # The share of the joint epochs, at its end, trained with hard 0/1 decisions
                  # forward (straight-through): the blocks adapt to the paths eval runs (0: the
                  # paper's soft gates throughout; docs/method.md).
                  "hard_tail": 0.0},
    },
    "loss": {
        "t": 0.5,  # target execution rate (eq. 15)
        "alpha": 0.2,  # SRM weight (eq. 16); 0 disables the SRM
        "phi": 0.5,  # triplet margin (eq. 12)
        "tie_eps": 1e-3,  # relative near-tie filter for triplets
        "bins": 16,  # colour-histogram bins per channel
        "cost_over": "block",  # eq. 15 per block; "network": one rate over all blocks (docs/method.md)
    },
    "train": {
        "deepspeed_config": "jobs/deepspeed/zero2.json",  # relative to the repo root or absolute
        "precision": "auto",  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
        # torch.compile of the training forward (DeepSpeed's engine.compile): none | default |
        # reduce-overhead (CUDA graphs: the routers' many small kernels launch as one) | max-autotune
        "compile": "none",
        # Capture the whole training step (forward, losses, backward, SGD update) as one CUDA graph
        # and replay it per batch; compile none or default. One GPU process with ZeRO-0 only:
        # elsewhere the step runs uncaptured, and the log says so.
        "cuda_graph": False,
        "checkpoint_every": 500,  # steps; checkpoints are also written at every epoch end
        "keep_checkpoints": 2,
        "log_every": 20,
        "eval_every": 1,  # epochs
        "deterministic": False,
        "dist_timeout": 600,  # seconds a collective may wait before the run fails
        "stop_at_step": 0,  # >0: checkpoint and exit for requeue at this step (time slicing)
        "progress": True,
    },
}

STAGES = ("warmup", "joint")
ROUTER_NORMS = ("none", "batch")  # rdinet.routers.NORMS, without importing torch here
COST_OVER = ("block", "network")  # rdinet.losses.COST_OVER, likewise
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # make CUDA graphs of their own, which cannot nest


def _parse_value(text: str):
    """Parse an override the way YAML would (numbers, booleans, lists, null)."""
    return yaml.safe_load(text) if text != "" else ""


def _check_type(key: str, default, value):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, float) and isinstance(value, str):
        return value  # e.g. model.gamma: "auto"; checked by the model
    if not isinstance(value, type(default)) or (isinstance(value, bool) and not isinstance(default, bool)):
        raise ConfigError(
            f"config key '{key}' must be of type {type(default).__name__} "
            f"(like the default {default!r}), got {value!r}")
    return value


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base))
            raise ConfigError(f"unknown config key '{dotted}'; known keys here: {known}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; give its sub-keys ({dotted}.KEY)")
            _merge(base[key], value, dotted + ".")
        else:
            base[key] = _check_type(dotted, base[key], value)


def parse_overrides(pairs: list[str]) -> dict:
    """['optim.lr=0.2', 'data.root=/x'] -> nested dict."""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override '{pair}' must look like key.sub=value")
        key, text = pair.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{pair}' conflicts with another override")
        node[parts[-1]] = _parse_value(text)
    return nested


def load_config(job: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict:
    """Resolve DEFAULTS <- job file <- overrides; raise ConfigError naming any bad key."""
    path = Path(job) if job else DEFAULT_JOB
    if not path.is_file():
        choices = ", ".join(sorted(p.stem for p in JOBS_DIR.glob("*.yaml")))
        raise ConfigError(f"job file '{path}' not found; jobs shipped in jobs/: {choices}")
    cfg = copy.deepcopy(DEFAULTS)
    for layer in _job_layers(path, seen=()):
        _merge(cfg, layer)
    _merge(cfg, parse_overrides(overrides or []))
    validate(cfg)
    return cfg


def with_defaults(saved: dict) -> dict:
    """A config saved by a run (its config.yaml or manifest) with the keys added since then at
    their defaults, which keep what such a run did (a new key's default is the old behaviour)."""
    cfg = copy.deepcopy(DEFAULTS)
    _merge(cfg, copy.deepcopy(saved))
    return cfg


def _job_layers(path: Path, seen: tuple) -> list[dict]:
    """A job file and the files it `extends` (relative to its folder), base first."""
    if path.resolve() in seen:
        raise ConfigError(f"job file '{path}' extends itself (through {[str(p) for p in seen]})")
    with open(path) as f:
        try:
            layer = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"job file '{path}' is not valid YAML: {err}") from None
    if not isinstance(layer, dict):
        raise ConfigError(f"job file '{path}' must be a mapping of config keys")
    base = layer.pop("extends", None)
    if base is None:
        return [layer]
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"job file '{path}' extends '{base}', which does not exist next to it")
    return _job_layers(base_path, seen + (path.resolve(),)) + [layer]


def validate(cfg: dict) -> None:
    if cfg["data"]["root"] in (None, ""):
        raise ConfigError("config key 'data.root' is not set: pass --set data.root=/path/to/dataset")
    if cfg["train"]["precision"] not in ("auto", "bf16", "fp32"):
        raise ConfigError("config key 'train.precision' must be one of auto, bf16, fp32")
    if cfg["train"]["compile"] not in COMPILE_MODES:
        raise ConfigError(f"config key 'train.compile' must be one of {', '.join(COMPILE_MODES)}")
    if cfg["train"]["cuda_graph"] and cfg["train"]["compile"] in GRAPHED_COMPILE_MODES:
        raise ConfigError(f"config key 'train.cuda_graph' captures the whole step, which cannot hold train.compile="
                          f"{cfg['train']['compile']}'s own CUDA graphs: set train.compile=default (or none)")
    if cfg["model"]["router_norm"] not in ROUTER_NORMS:
        raise ConfigError(f"config key 'model.router_norm' must be one of {', '.join(ROUTER_NORMS)}")
    if cfg["stages"]["joint"]["mode"] not in ("joint", "full"):
        raise ConfigError("config key 'stages.joint.mode' must be 'joint' (RDI-Net) or 'full' (static ResNet)")
    for stage in STAGES:
        if cfg["stages"][stage]["epochs"] < 0:
            raise ConfigError(f"config key 'stages.{stage}.epochs' must be >= 0")
    if cfg["stages"]["joint"]["epochs"] < 1:
        raise ConfigError("config key 'stages.joint.epochs' must be >= 1")
    if cfg["loss"]["cost_over"] not in COST_OVER:
        raise ConfigError(f"config key 'loss.cost_over' must be one of {', '.join(COST_OVER)}")
    if not 0.0 <= cfg["stages"]["joint"]["hard_tail"] <= 1.0:
        raise ConfigError("config key 'stages.joint.hard_tail' is a share of the joint epochs: give a number in [0, 1]")


def enabled_stages(cfg: dict) -> list[str]:
    """Stages this job runs, in order (warm-up only when it has epochs)."""
    return [s for s in STAGES if cfg["stages"][s]["epochs"] > 0]


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
