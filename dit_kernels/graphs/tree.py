"""A forward's arguments (or outputs) as a flat list of tensors plus a hashable skeleton, and back.

The skeleton is the graph key: every tensor becomes its ``TensorSpec`` (shape, stride, dtype, device) and
every other leaf stays as ``(type, value)``, so ``None`` vs a tensor, ``return_dict``, a LoRA ``scale`` in
``joint_attention_kwargs`` or a different resolution each select a different graph. Containers (tuples,
lists, dicts, namedtuples, diffusers' ``BaseOutput`` dataclasses) nest: FLUX's ``image_rotary_emb``,
HunyuanDiT's ``(cos, sin)`` tuple, ``joint_attention_kwargs`` dicts. Anything else (an unhashable object,
a generator) raises ``Unsupported``: such a call is not keyable and runs eagerly.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Hashable, Iterator

import torch
from torch import Tensor

# Leaves kept by value in the key (their type too: 1, 1.0 and True hash alike but may steer code apart).
CONSTANTS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format,
             enum.Enum)  # fmt: skip


class Unsupported(TypeError):
    """An argument the runner cannot turn into a key (the message names its type)."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """What a graph fixes about a tensor argument: its layout, dtype and device (not its values)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, t: Tensor) -> "TensorSpec":
        return cls(tuple(t.shape), t.stride(), t.dtype, t.device)

    def __str__(self) -> str:
        return f"{list(self.shape)} {str(self.dtype).removeprefix('torch.')}"


def flatten(tree) -> tuple[list[Tensor], Hashable]:
    """``(tensors in visiting order, skeleton)``; ``rebuild(skeleton, tensors)`` gives ``tree`` back."""
    tensors: list[Tensor] = []

    def visit(x):
        if isinstance(x, Tensor):
            tensors.append(x)
            return TensorSpec.of(x)
        if isinstance(x, (tuple, list)):
            return type(x), tuple(visit(v) for v in x)
        if isinstance(x, dict):
            return type(x), tuple((k, visit(v)) for k, v in x.items())
        if isinstance(x, CONSTANTS):
            return type(x), x
        raise Unsupported(f"an argument of type {type(x).__qualname__} (not a tensor, a container or a constant)")

    return tensors, visit(tree)


def rebuild(skeleton: Hashable, tensors: Iterator[Tensor] | list[Tensor]):
    """The tree ``flatten`` described, with ``tensors`` (in the same order) in place of the tensor leaves."""
    return _rebuild(skeleton, iter(tensors))


def _rebuild(skeleton, tensors: Iterator[Tensor]):
    if isinstance(skeleton, TensorSpec):
        return next(tensors)
    kind, payload = skeleton
    if issubclass(kind, dict):
        items = {k: _rebuild(v, tensors) for k, v in payload}
        return kind(**items) if dataclasses.is_dataclass(kind) else kind(items)  # BaseOutput takes fields
    if issubclass(kind, (tuple, list)):
        items = [_rebuild(v, tensors) for v in payload]
        return kind(*items) if hasattr(kind, "_fields") else kind(items)  # namedtuple takes positions
    return payload


def describe(skeleton: Hashable) -> str:
    """The tensor layouts of a key, for reports: ``[2, 24, 16] float32, [2, 8, 32] float32, ...``."""
    specs: list[TensorSpec] = []

    def visit(node):
        if isinstance(node, TensorSpec):
            specs.append(node)
        elif isinstance(node[1], tuple) and issubclass(node[0], (tuple, list, dict)):
            for child in node[1]:
                visit(child[1] if issubclass(node[0], dict) else child)

    visit(skeleton)
    return ", ".join(map(str, specs)) or "no tensors"
