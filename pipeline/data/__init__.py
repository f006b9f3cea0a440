"""DALI data loaders for CIFAR-10/100 and ImageNet, a generated dataset, and a preflight check.

    from pipeline.data import DATA_DEFAULTS, build_loader, DataError
    from pipeline.data.generate import ensure_generated
"""
from .defaults import DATA_DEFAULTS
from .errors import DataError
from .loader import Loader, build_loader

__all__ = ["DATA_DEFAULTS", "DataError", "Loader", "build_loader"]
