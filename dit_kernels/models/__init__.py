"""The registry of model families: one module per family, each exporting ``FAMILY`` (a ``Family``).

Adding a family: its module (``models/<name>.py``, ``FAMILY = Family(name="<name>", ...)``), its line in
``FAMILY_MODULES`` and its tests; nothing else names it (docs/adding-a-family.md).
"""

from __future__ import annotations

import importlib
from typing import Optional

from torch import nn

from dit_kernels.models.family import Family, Shape

# Families with a patcher: all five (DiT, PixArt, SD3/3.5, FLUX, HunyuanDiT); patch refuses any other class
# with the list of supported classes. Imported on first use (each module imports its diffusers classes).
FAMILY_MODULES = ("dit", "pixart", "sd3", "flux", "hunyuan", "wan", "latte")
DEFAULT_FAMILY = "flux"  # what the main job (python -m dit_kernels.bench) runs unless told otherwise

__all__ = ["FAMILY_MODULES", "DEFAULT_FAMILY", "Family", "Shape", "families", "family_named", "family_of", "supported_classes"]


def families() -> list[Family]:
    """Every registered family, in ``FAMILY_MODULES`` order."""
    return [importlib.import_module(f"dit_kernels.models.{name}").FAMILY for name in FAMILY_MODULES]


def family_named(name: str) -> Family:
    """The family called ``name``; ValueError naming the choices otherwise."""
    if name not in FAMILY_MODULES:
        raise ValueError(f"unknown model family {name!r}; choose one of {FAMILY_MODULES}")
    return importlib.import_module(f"dit_kernels.models.{name}").FAMILY


def family_of(transformer: nn.Module) -> Optional[Family]:
    """The family with ``type(transformer)`` among its classes, or None.

    Exact match, not isinstance: a subclass may override the forward paths a patcher replaces."""
    for family in families():
        if type(transformer) in family.classes:
            return family
    return None


def supported_classes() -> list[str]:
    return [cls.__name__ for family in families() for cls in family.classes]
