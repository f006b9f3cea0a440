"""Job configuration: defaults, YAML job files, dotted `--set` overrides, validation.

The dataclasses below are the schema: every key with its type, default and choices or range.
A job file holds a subset of them; `--set key.sub=value` overrides one leaf. load_config returns
the nested dict the code reads (DEFAULTS filled in). Unknown keys and values of the wrong type (a
string for a number included) are refused with the key's name, so a typo never trains silently.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import asdict, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin, get_type_hints

import yaml

from pipeline.data.defaults import DATA_DEFAULTS

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
DEFAULT_JOB = JOBS_DIR / "demo.yaml"


class ConfigError(ValueError):
    """A job file or override that cannot be used; the message names the key and the fix."""


ROUTER_NORMS = ("none", "batch")  # rdinet.routers.NORMS, without importing torch here
COST_OVER = ("block", "network")  # rdinet.losses.COST_OVER, likewise
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # make CUDA graphs of their own, which cannot nest


# Field helpers: a range (None: unbounded) is kept in the field's metadata; a list default is made anew.
def at_least(low, default):
    return field(default=default, metadata={"range": (low, None)})


def within(low: float, high: float, default: float):
    return field(default=default, metadata={"range": (low, high)})


def listed(*default):
    return field(default_factory=lambda: list(default))


# The schema: every key, its type and its default. A value must have the key's type (an int is a
# float; a bool is never a number; None only where the type allows it); Literal lists the choices.
@dataclass
class Model:
    arch: str = "resnet110"
    num_classes: int = 10
    gamma: float | Literal["auto"] = within(0.0, 1.0, 0.5)
    r: int = 2
    d: int = 256
    tau: float = 1.0
    # Gates in training: false = the paper's soft Gumbel-softmax relaxation; true = hard 0/1
    # decisions forward (straight-through gradients), so training runs the paths eval runs.
    straight_through: bool = False
    # none = the paper's router; batch = a BatchNorm before each of its ReLUs (docs/method.md)
    router_norm: Literal[ROUTER_NORMS] = "none"
    # path to torchvision ResNet weights for the blocks (ImageNet nets); loaded after the model is made
    pretrained: str | None = field(default=None, metadata={"model_arg": False})


# The data keys, their defaults and comments live with the loader (pipeline/data/defaults.py), which
# also checks them per dataset; their types here are the defaults' (None: a path, or unset).
Data = make_dataclass("Data", [(key, str | None if value is None else type(value), field(default=value))
                               for key, value in DATA_DEFAULTS.items()])


@dataclass
class Optim:
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    reference_batch: int = 256  # lr scales linearly with global batch / reference_batch (0: off)
    warmup_epochs: float = 0.0  # linear lr warm-up at the start of each stage
    lr_decay: float = 0.1


@dataclass
class Warmup:
    """USW warm-up (eq. 14). epochs 0 disables it: joint then starts from scratch."""
    epochs: int = at_least(0, 30)
    milestones: list[int] = listed()


@dataclass
class Joint:
    """mode "joint": routers + L_cost + alpha L_rank (eq. 16); "full": the static ResNet baseline."""
    epochs: int = at_least(1, 320)
    milestones: list[int] = listed(250, 300)
    mode: Literal["joint", "full"] = "joint"
    # The share of the joint epochs, at its end, trained with hard 0/1 decisions forward
    # (straight-through): the blocks adapt to the paths eval runs (0: the paper's soft gates
    # throughout; docs/method.md).
    hard_tail: float = within(0.0, 1.0, 0.0)


@dataclass
class Stages:
    warmup: Warmup = field(default_factory=Warmup)
    joint: Joint = field(default_factory=Joint)


@dataclass
class Loss:
    t: float = 0.5  # target execution rate (eq. 15)
    alpha: float = 0.2  # SRM weight (eq. 16); 0 disables the SRM
    phi: float = 0.5  # triplet margin (eq. 12)
    tie_eps: float = 1e-3  # relative near-tie filter for triplets
    bins: int = 16  # colour-histogram bins per channel
    cost_over: Literal[COST_OVER] = "block"  # eq. 15 per block; "network": one rate over all blocks (docs/method.md)


@dataclass
class Train:
    deepspeed_config: str = "jobs/deepspeed/zero2.json"  # relative to the repo root or absolute
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # torch.compile of the training forward (DeepSpeed's engine.compile): none | default |
    # reduce-overhead (CUDA graphs: the routers' many small kernels launch as one) | max-autotune
    compile: Literal[COMPILE_MODES] = "none"
    # Capture the whole training step (forward, losses, backward, SGD update) as one CUDA graph
    # and replay it per batch; compile none or default. One GPU process with ZeRO-0 only:
    # elsewhere the step runs uncaptured, and the log says so.
    cuda_graph: bool = False
    checkpoint_every: int = 500  # steps; checkpoints are also written at every epoch end
    keep_checkpoints: int = 2
    log_every: int = 20
    eval_every: int = 1  # epochs
    deterministic: bool = False
    dist_timeout: int = 600  # seconds a collective may wait before the run fails
    stop_at_step: int = 0  # >0: checkpoint and exit for requeue at this step (time slicing)
    progress: bool = True


@dataclass
class Config:
    job: str = "unnamed"  # the job's name; a run directory belongs to one job
    seed: int = 0
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    optim: Optim = field(default_factory=Optim)
    stages: Stages = field(default_factory=Stages)
    loss: Loss = field(default_factory=Loss)
    train: Train = field(default_factory=Train)


DEFAULTS = asdict(Config())  # the nested dict that load_config fills in and the code reads
STAGES = tuple(f.name for f in fields(Stages))
# rdinet.create_model's arguments: the model keys but those marked otherwise.
MODEL_ARGS = tuple(f.name for f in fields(Model) if f.metadata.get("model_arg", True))
# Keys that play no part in the USW warm-up's result (routers are frozen then; no losses but the
# task's; the joint stage comes after), so jobs that differ only in them share one (pipeline/sweep.py).
NOT_IN_WARMUP = ("job", "loss", "stages.joint", "model.gamma", "model.r", "model.tau",
                 "model.straight_through", "model.router_norm")


def _leaves(schema, prefix: str = "") -> dict:
    """{dotted key: (type, field)} for every leaf of a schema dataclass."""
    leaves = {}
    hints = get_type_hints(schema)
    for f in fields(schema):
        if is_dataclass(hints[f.name]):
            leaves.update(_leaves(hints[f.name], f"{prefix}{f.name}."))
        else:
            leaves[f"{prefix}{f.name}"] = (hints[f.name], f)
    return leaves


LEAVES = _leaves(Config)


class _Loader(yaml.SafeLoader):
    """YAML's loader, but 1e-4 is a number, as in YAML 1.2 (PyYAML reads it as a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
    r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _parse_value(text: str):
    """Parse an override the way YAML would (numbers, booleans, lists, null)."""
    return yaml.load(text, Loader=_Loader) if text != "" else ""


def _matches(kind, value) -> bool:
    """Whether value is of the schema type kind (ints count as floats, bools never as numbers)."""
    if get_origin(kind) is Literal:
        return value in get_args(kind)
    if get_origin(kind) in (UnionType, Union):
        return any(_matches(arm, value) for arm in get_args(kind))
    if get_origin(kind) is list:
        return isinstance(value, list) and all(_matches(get_args(kind)[0], item) for item in value)
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _type_name(kind) -> str:
    if get_origin(kind) is Literal:
        return " or ".join(repr(choice) for choice in get_args(kind))
    if get_origin(kind) in (UnionType, Union):
        return " or ".join("null" if arm is type(None) else _type_name(arm) for arm in get_args(kind))
    if get_origin(kind) is list:
        return f"list of {_type_name(get_args(kind)[0])}"
    return kind.__name__


def _check_type(key: str, current, value):
    """value for key, checked against the schema (with the value it replaces, for the message)."""
    kind, spec = LEAVES[key]
    if kind is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if get_origin(kind) is Literal and not _matches(kind, value):
        raise ConfigError(f"config key '{key}' must be one of {', '.join(get_args(kind))}, got {value!r}")
    if not _matches(kind, value):
        raise ConfigError(f"config key '{key}' must be of type {_type_name(kind)} "
                          f"(like the default {current!r}), got {value!r}")
    low, high = spec.metadata.get("range", (None, None))
    if isinstance(value, (int, float)) and high is not None and not low <= value <= high:
        raise ConfigError(f"config key '{key}' must be in [{low:g}, {high:g}], got {value!r}")
    if isinstance(value, (int, float)) and low is not None and value < low:
        raise ConfigError(f"config key '{key}' must be >= {low}, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and float in (kind, *get_args(kind)):
        return float(value)  # as YAML would have read 1.0
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
            layer = yaml.load(f, Loader=_Loader) or {}
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
    """The rules between keys; each key's own type, choices and range are checked as it is set."""
    if cfg["data"]["root"] in (None, ""):
        raise ConfigError("config key 'data.root' is not set: pass --set data.root=/path/to/dataset")
    if nests_cuda_graphs(cfg["train"]["compile"], cfg["train"]["cuda_graph"]):
        raise ConfigError(f"config key 'train.cuda_graph' captures the whole step, which cannot hold train.compile="
                          f"{cfg['train']['compile']}'s own CUDA graphs: set train.compile=default (or none)")


def nests_cuda_graphs(compile_mode: str, cuda_graph: bool) -> bool:
    """The compile / CUDA graph rule, for the config and the benchmarks' flags: a step captured whole
    as one CUDA graph cannot hold the CUDA graphs that some compile modes make of their own."""
    return cuda_graph and compile_mode in GRAPHED_COMPILE_MODES


def without(cfg: dict, keys: tuple) -> dict:
    """A copy of cfg without the dotted keys (leaves or whole sections)."""
    cfg = copy.deepcopy(cfg)
    for dotted in keys:
        *sections, name = dotted.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        del node[name]
    return cfg


def enabled_stages(cfg: dict) -> list[str]:
    """Stages this job runs, in order (warm-up only when it has epochs)."""
    return [s for s in STAGES if cfg["stages"][s]["epochs"] > 0]


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
