"""What the rest of the library needs to know about a transformer whose sequence is sharded over ranks
(context parallelism), read from diffusers' ``transformer._parallel_config``: set by
``dit_kernels.enable_parallelism`` and by diffusers' own ``enable_parallelism`` alike."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch.distributed as dist
from torch import Tensor, nn


def sum_over_shards(transformer: nn.Module) -> Optional[Callable[[Tensor], Tensor]]:
    """``x -> sum of x over the ranks that hold the other shards of transformer's sequence`` (an in-place
    all-reduce), or None when the sequence is not sharded. The step cache sums its per-rank change measure
    with it, so that every rank takes the same decision."""
    config = getattr(transformer, "_parallel_config", None)
    context = None if config is None else config.context_parallel_config
    if context is None:
        return None
    return functools.partial(_all_reduce_sum, group=context._flattened_mesh.get_group())


def _all_reduce_sum(x: Tensor, group) -> Tensor:
    dist.all_reduce(x, group=group)
    return x
