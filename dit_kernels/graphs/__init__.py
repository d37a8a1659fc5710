"""CUDA-graph runner for the drop-in transformer forward (docs/architecture.md, "CUDA graphs").

``patch(pipe, cuda_graphs=True | "auto")`` on CUDA wraps the transformer's forward in a ``GraphRunner``:
per input layout (shapes, strides, dtypes, devices and every non-tensor argument) it warms the forward
up, captures it in a ``torch.cuda.CUDAGraph`` over static input buffers (one memory pool for all keys),
then copies each call's inputs in, replays and clones the outputs out. Keys are kept LRU
(``GraphConfig.max_keys`` / ``max_bytes``); a capture that fails runs that key eagerly, with the reason
in the ``PatchReport``. With the step cache (``cache=...``) each block gets its own runner instead, so
that no recording spans the cache's per-step decision (``install``). ``graph_runners(pipe)`` gives the
runners (stats, keys, bytes, config, ``reset()``).

What a recording cannot see: it replays the kernels and parameter tensors it was captured with. Weights
updated in place (``load_state_dict``) are read by the replay; a submodule or parameter assigned anywhere
(peft injecting LoRA layers, a module swap) makes every runner capture afresh; a Python-level setting
the forward reads (``set_adapters`` scales, a ``.data =`` weight swap, the diffusers attention backend)
needs ``reset()`` of each runner (``graph_runners(pipe)``).

``patch(..., cuda_graphs=GraphConfig(...))`` sets the runners' config; ``GraphConfig(backend=
EagerReplayBackend())`` runs the same runner on CPU (tests): "replay" re-runs the recorded function and
rewrites the static outputs; ``strict=True`` fails the capture on ops that would sync the host.
"""

from dit_kernels.graphs.backends import HOST_SYNC_OPS, CudaGraphBackend, EagerReplayBackend, HostSyncError
from dit_kernels.graphs.patching import apply, check_option, graph_runners, install
from dit_kernels.graphs.runner import GraphConfig, GraphRunner

__all__ = ["GraphRunner", "GraphConfig", "CudaGraphBackend", "EagerReplayBackend", "HostSyncError", "HOST_SYNC_OPS",
           "apply", "check_option", "install", "graph_runners"]  # fmt: skip
