"""One patcher per model family: which diffusers module becomes which fused op.

Each family module defines:

- ``FAMILY``: its name in reports;
- ``TRANSFORMER_CLASS``: the diffusers transformer class it patches (imported lazily by ``family_of``);
- ``validate(transformer)``: raise ValueError naming what it does not recognise (a config or a module
  it cannot reproduce exactly), before anything changes;
- ``apply(transformer, patcher)``: swap block forwards / attention processors through ``patcher``.
"""

from __future__ import annotations

import importlib

# Families with a patcher: all five (DiT, PixArt, SD3/3.5, FLUX, HunyuanDiT); patch refuses any other class
# with the list of supported classes.
FAMILY_MODULES = ("dit", "pixart", "sd3", "flux", "hunyuan")


def families():
    """The family modules, imported on first use (each imports its diffusers classes)."""
    return [importlib.import_module(f"dit_kernels.models.{name}") for name in FAMILY_MODULES]


def supported_classes() -> list[str]:
    return [family.TRANSFORMER_CLASS.__name__ for family in families()]


def family_of(transformer):
    """The family module whose transformer class is exactly ``type(transformer)``, or None.

    Exact match, not isinstance: a subclass may override the forward paths a patcher replaces."""
    for family in families():
        if type(transformer) is family.TRANSFORMER_CLASS:
            return family
    return None
