"""Installing the runners: what ``patch(..., cuda_graphs=...)`` does.

One ``GraphRunner`` becomes the transformer's ``forward`` instance attribute, wrapping whatever
``forward`` was there: the whole forward, patched blocks included, is one recording per input layout.
The step cache decides before the forward runs, so its forward wraps this runner: a computed step
replays, a skipped one runs nothing.

With ``CacheConfig(cfg="per_half")`` a step may run the blocks on one half of the batch, which the cache
arranges from inside each block's forward, so no recording may span the blocks: ``apply`` is then called
before the cache attaches, with the blocks the cache will wrap, and gives each block its own runner
inside the cache's wrapper (a half batch is another input layout, captured once). The embeddings before
the blocks and the output layers after them then run eagerly.

Everything goes through the patch's ``Patcher`` (``unpatch`` removes it); the runners are listed in the
transformer's ``_dit_kernels_graph_runners`` (``graph_runners``). Fallbacks (no CUDA, a hooked forward,
a key whose capture failed) are reported in the ``PatchReport``'s fallbacks, at patch time or when the
key first comes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from dit_kernels.graphs.backends import CudaGraphBackend
from dit_kernels.graphs.runner import GraphConfig, GraphRunner
from dit_kernels.patching import Patcher, find_transformer

WHAT = "CUDA graphs"
RUNNERS = "_dit_kernels_graph_runners"
CHOICES = (True, False, "auto")  # or a GraphConfig


def check_option(cuda_graphs) -> None:
    """ValueError unless ``cuda_graphs`` is True, False, "auto" or a GraphConfig."""
    if not (isinstance(cuda_graphs, GraphConfig) or cuda_graphs in CHOICES):
        raise ValueError(f"cuda_graphs must be True, False, 'auto' or a GraphConfig, got {cuda_graphs!r}")


def apply(transformer: nn.Module, patcher: Patcher, cuda_graphs: Union[bool, str, GraphConfig], device: torch.device,
          cached_blocks: Optional[Sequence[nn.Module]] = None) -> dict[str, GraphRunner]:  # fmt: skip
    """``patch``'s ``cuda_graphs`` option: "auto" captures on CUDA and does nothing elsewhere; True captures
    on CUDA and reports why not elsewhere; a ``GraphConfig``: as True with that config (and its backend, which
    may run on another device); False does nothing. ``cached_blocks``: the blocks the step cache is about to
    wrap (a runner per block, see the module docstring); None: the whole forward. Returns the runners
    installed, by module name."""
    if cuda_graphs is False or (isinstance(cuda_graphs, str) and device.type != "cuda"):
        return {}
    config = cuda_graphs if isinstance(cuda_graphs, GraphConfig) else GraphConfig()
    backend = CudaGraphBackend() if config.backend is None else config.backend
    why = _unavailable(transformer, device, backend)
    if why is not None:
        patcher.fallback(WHAT, f"{why}; the forward runs eagerly")
        return {}
    names = {id(module): name for name, module in transformer.named_modules()}
    targets = [("forward", transformer)] if cached_blocks is None else [(names[id(b)], b) for b in cached_blocks]
    per_block = cached_blocks is not None
    runners = {name: install(module, patcher, backend, config, name, may_alias=not per_block)
               for name, module in targets}  # fmt: skip
    patcher.set_attr(transformer, RUNNERS, runners, f"{len(runners)} graph runner(s), shared memory pool")
    return runners


def _unavailable(transformer: nn.Module, device: torch.device, backend) -> Optional[str]:
    if backend.device_type is not None and device.type != backend.device_type:
        return f"unavailable: the model is on {device.type} and CUDA graphs need a CUDA device"
    if "forward" in transformer.__dict__:
        return (f"{type(transformer).__name__}.forward is wrapped by a hook ({transformer.__dict__['forward']!r}, "
                "e.g. accelerate offloading), whose weights or control flow may change between calls")
    return None


def install(module: nn.Module, patcher: Patcher, backend, config: Optional[GraphConfig], label: str,
            may_alias: bool = True) -> GraphRunner:  # fmt: skip
    """Wrap ``module.forward`` in a ``GraphRunner`` on ``backend``, recorded by ``patcher``; its fallbacks
    are reported under ``label``; ``may_alias=False``: outputs always cloned."""
    prefix = "" if label == "forward" else f"{label}: "
    runner = GraphRunner(module.forward, backend, config, lambda why: patcher.fallback(WHAT, prefix + why), module,
                         may_alias)  # fmt: skip
    patcher.set_attr(module, "forward", runner, f"GraphRunner ({backend.name}): captured per input layout")
    return runner


def graph_runners(pipe_or_transformer) -> dict[str, GraphRunner]:
    """The transformer's runners by module name ("forward" for the whole forward), each with its ``stats``,
    ``keys``, ``nbytes``, ``config`` and ``reset()``; empty when nothing is graphed."""
    return dict(find_transformer(pipe_or_transformer).__dict__.get(RUNNERS, {}))
