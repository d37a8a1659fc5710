"""Context-parallel plans in diffusers' format, and shorthands for writing them in a family's file.

A plan maps a module's qualified name ("" = the transformer; ``*`` stands for every entry of a ModuleList)
to what happens at its boundary:

- ``{argument name: split(dim)}``: split that input along ``dim`` before the module runs (a tuple
  argument, such as a (cos, sin) RoPE pair, takes a tuple of specs);
- ``{output index: split_output(dim)}``: split that output after the module ran (a module that builds
  sequence-long tables or tokens from unsplit inputs: patch embeddings, RoPE);
- ``gather(dim)``: all-gather the module's output along ``dim`` (the last projection before the
  transformer reshapes its tokens back to an image);
- ``{argument name: repeated(dim)}``: an input that repeats one value per sample for every position of the
  split sequence (sample-major, as ``repeat_interleave`` makes it: Latte's per-position timesteps): each rank
  keeps every P-th row, which is one per local position of each sample;
- ``local()`` on an attention module: it attends within what each rank holds (a sequence that is not split,
  as Latte's temporal attention across the frames at each of the rank's positions), with no communication.

Each rank keeps the ``rank``-th of P equal chunks (P = ring x Ulysses degree); a length that P does not
divide is refused when it reaches the split. ``dims``: the tensor's expected number of dimensions; a
tensor with another number passes whole (diffusers' rule: e.g. Wan's 1-D timestep, split only when
per-token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput


@dataclass(frozen=True)
class Repeated:
    """An input whose rows along ``dim`` repeat each sample's value over the split sequence (see above)."""

    dim: int
    expected_dims: int


@dataclass(frozen=True)
class Local:
    """An attention module that attends locally (see above)."""


Plan = dict[str, Union[dict, ContextParallelOutput, Local]]


def split(dim: int, dims: int) -> ContextParallelInput:
    """Split this input along ``dim`` before the module runs."""
    return ContextParallelInput(split_dim=dim, expected_dims=dims)


def split_output(dim: int, dims: int) -> ContextParallelInput:
    """Split this output along ``dim`` after the module ran."""
    return ContextParallelInput(split_dim=dim, expected_dims=dims, split_output=True)


def gather(dim: int, dims: int) -> ContextParallelOutput:
    """All-gather the module's output along ``dim``."""
    return ContextParallelOutput(gather_dim=dim, expected_dims=dims)


def repeated(dim: int, dims: int) -> Repeated:
    """Keep every P-th row of this input along ``dim`` (one value per local position of each sample)."""
    return Repeated(dim, dims)


def local() -> Local:
    """This attention module attends within what each rank holds."""
    return Local()
