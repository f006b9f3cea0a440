"""ResNet backbones as a flat list of residual blocks (CIFAR ResNet-20..110, ImageNet ResNet-50/101).

The blocks are torchvision's BasicBlock / Bottleneck with two extra methods, `residual` and
`shortcut`, so that a block can be skipped (only its shortcut runs) or blended (eq. 1) without
computing the shortcut twice. Their parameter names are torchvision's, so torchvision's ResNet
weights load into them (`load_torchvision_weights`).
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet


class BasicBlock(tv_resnet.BasicBlock):
    """torchvision's BasicBlock, split into residual branch and shortcut."""

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class Bottleneck(tv_resnet.Bottleneck):
    """torchvision's Bottleneck (stride on the 3x3 conv), split into residual branch and shortcut."""

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


@dataclass(frozen=True)
class ArchSpec:
    family: str  # "cifar" (3x3 stem, 16/32/64 channels) or "imagenet" (7x7 stem + max-pool)
    block: type
    layers: tuple[int, ...]  # blocks per stage
    default_classes: int


ARCHS: dict[str, ArchSpec] = {
    "resnet20": ArchSpec("cifar", BasicBlock, (3, 3, 3), 10),
    "resnet32": ArchSpec("cifar", BasicBlock, (5, 5, 5), 10),
    "resnet56": ArchSpec("cifar", BasicBlock, (9, 9, 9), 10),
    "resnet110": ArchSpec("cifar", BasicBlock, (18, 18, 18), 10),
    "resnet50": ArchSpec("imagenet", Bottleneck, (3, 4, 6, 3), 1000),
    "resnet101": ArchSpec("imagenet", Bottleneck, (3, 4, 23, 3), 1000),
}


def arch_spec(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not known; accepted values: {sorted(ARCHS)}")
    return ARCHS[arch]


def _projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Option-B shortcut: 1x1 conv + BN (torchvision's `downsample`)."""
    return nn.Sequential(
        tv_resnet.conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
    )


def build_backbone(arch: str) -> tuple[nn.Sequential, list[nn.Module], int]:
    """Returns (stem, blocks, feature channels of the last block)."""
    spec = arch_spec(arch)
    if spec.family == "cifar":
        widths, stem_width = (16, 32, 64), 16
        stem = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(3, stem_width, 3, 1, 1, bias=False),
            bn1=nn.BatchNorm2d(stem_width),
            relu=nn.ReLU(inplace=True),
        ))
    else:
        widths, stem_width = (64, 128, 256, 512), 64
        stem = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(3, stem_width, 7, 2, 3, bias=False),
            bn1=nn.BatchNorm2d(stem_width),
            relu=nn.ReLU(inplace=True),
            maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ))
    blocks: list[nn.Module] = []
    channels = stem_width
    for stage, (width, depth) in enumerate(zip(widths, spec.layers)):
        for index in range(depth):
            stride = 2 if stage > 0 and index == 0 else 1
            out_channels = width * spec.block.expansion
            downsample = None
            if stride != 1 or channels != out_channels:
                downsample = _projection(channels, out_channels, stride)
            blocks.append(spec.block(channels, width, stride, downsample))
            channels = out_channels
    for module in [stem, *blocks]:
        _init_weights(module)
    return stem, blocks, channels


def _init_weights(module: nn.Module) -> None:
    # torchvision's ResNet initialisation.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def torchvision_block_names(arch: str) -> list[str]:
    """torchvision prefixes ("layer1.0", ...) of the blocks, in the model's flat order."""
    spec = arch_spec(arch)
    return [f"layer{s + 1}.{i}" for s, depth in enumerate(spec.layers) for i in range(depth)]


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # model keys that received a tensor
    missing: list[str] = field(default_factory=list)  # backbone keys of the model left untouched
    unexpected: list[str] = field(default_factory=list)  # source keys with no place in the model
    skipped: list[str] = field(default_factory=list)  # source keys whose shape did not fit (e.g. fc)

    def __str__(self) -> str:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

        lines = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing", "unexpected", "skipped"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name}: {show(keys)}")
        return "; ".join(lines)


def load_torchvision_weights(model: nn.Module, state_dict_or_path, strict: bool = True) -> LoadReport:
    """Loads a torchvision ResNet state dict (or a .pth / .safetensors file of one) into an
    RDI-Net built on the same ImageNet architecture: conv1/bn1 -> stem, layerS.I -> blocks.K,
    fc -> fc (skipped with a note when the number of classes differs). Routers are not touched.

    strict=True raises ValueError if any stem/block tensor of the model is missing from the
    source or any source tensor has no place in the model; the report lists the keys either way.
    """
    state = _read_state_dict(state_dict_or_path)
    arch = getattr(model, "arch", None)
    if arch is None or arch_spec(arch).family != "imagenet":
        raise ValueError(
            f"load_torchvision_weights needs an ImageNet RDI-Net (resnet50 or resnet101); got arch={arch!r}"
        )
    block_index = {name: k for k, name in enumerate(torchvision_block_names(arch))}
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    report = LoadReport()
    for key, tensor in state.items():
        new_key = _map_key(key, block_index)
        if new_key is None or new_key not in target:
            report.unexpected.append(key)
        elif target[new_key].shape != tensor.shape:
            report.skipped.append(f"{key} {tuple(tensor.shape)} -> {new_key} {tuple(target[new_key].shape)}")
        else:
            mapped[new_key] = tensor
    backbone_keys = [k for k in target if not k.startswith("routers.")]
    report.missing = [k for k in backbone_keys if k not in mapped and not k.startswith("fc.")]
    report.loaded = sorted(mapped)
    if strict and (report.missing or report.unexpected):
        raise ValueError(
            f"torchvision weights do not fit the {arch} model ({report}); check that the state dict "
            f"is a torchvision {arch}, or pass strict=False to load what fits"
        )
    model.load_state_dict(mapped, strict=False)
    return report


def _read_state_dict(state_dict_or_path) -> dict[str, torch.Tensor]:
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = os.fspath(state_dict_or_path)
        if not os.path.isfile(path):
            raise ValueError(f"state_dict_or_path={path!r} is not a file")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict_or_path, dict):
        return state_dict_or_path
    raise ValueError(
        f"state_dict_or_path must be a state dict or a file path; got {type(state_dict_or_path).__name__}"
    )


_BLOCK_KEY = re.compile(r"^(layer\d+\.\d+)\.(.+)$")


def _map_key(key: str, block_index: dict[str, int]) -> str | None:
    key = key.removeprefix("module.")  # saved from DistributedDataParallel
    if key.startswith(("conv1.", "bn1.")):
        return "stem." + key
    if key.startswith("fc."):
        return key
    match = _BLOCK_KEY.match(key)
    if match and match.group(1) in block_index:
        return f"blocks.{block_index[match.group(1)]}.{match.group(2)}"
    return None
