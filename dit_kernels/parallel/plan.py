"""Context-parallel plans in diffusers' format, and shorthands for writing them in a family's file.

A plan maps a module's qualified name ("" = the transformer; ``*`` stands for every entry of a ModuleList)
to what happens at its boundary:

- ``{argument name: split(dim)}``: split that input along ``dim`` before the module runs (a tuple
  argument, such as a (cos, sin) RoPE pair, takes a tuple of specs);
- ``{output index: split_output(dim)}``: split that output after the module ran (a module that builds
  sequence-long tables or tokens from unsplit inputs: patch embeddings, RoPE);
- ``gather(dim)``: all-gather the module's output along ``dim`` (the last projection before the
  transformer reshapes its tokens back to an image).

Each rank keeps the ``rank``-th of P equal chunks (P = ring x Ulysses degree); a length that P does not
divide is refused when it reaches the split. ``dims``: the tensor's expected number of dimensions; a
tensor with another number passes whole (diffusers' rule: e.g. Wan's 1-D timestep, split only when
per-token).
"""

from __future__ import annotations

from typing import Union

from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

Plan = dict[str, Union[dict, ContextParallelOutput]]


def split(dim: int, dims: int) -> ContextParallelInput:
    """Split this input along ``dim`` before the module runs."""
    return ContextParallelInput(split_dim=dim, expected_dims=dims)


def split_output(dim: int, dims: int) -> ContextParallelInput:
    """Split this output along ``dim`` after the module ran."""
    return ContextParallelInput(split_dim=dim, expected_dims=dims, split_output=True)


def gather(dim: int, dims: int) -> ContextParallelOutput:
    """All-gather the module's output along ``dim``."""
    return ContextParallelOutput(gather_dim=dim, expected_dims=dims)
