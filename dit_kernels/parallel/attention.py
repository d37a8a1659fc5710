"""Attention over a sequence sharded across ranks (context parallelism), with dit_kernels' attention as
the local op.

diffusers' templated context-parallel attention moves the shards; this module supplies what runs between
the moves:

- Ulysses (``ulysses_degree`` N): q, k, v [B, S/N, H, Dh] on each rank go through one all-to-all to
  [B, S, H/N, Dh] (the whole sequence, a slice of the heads), attention runs locally with
  ``joint_attention`` (our kernel choice: flash-attention, our Triton kernel, SDPA), and a second
  all-to-all returns [B, S/N, H, Dh]. Needs H divisible by N.
- Ring (``ring_degree`` R): each rank attends its queries to every rank's K/V shard in turn and merges the
  partial results by their log-sum-exp, ``out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)``; the
  local op must return the log-sum-exp, which ``attention_with_lse`` does.

Inference only: the backward of these autograd functions raises.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from diffusers.models.attention_dispatch import _templated_context_parallel_attention
from torch import Tensor

from dit_kernels.ops import joint_attention


def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, parallel_config, *, mask: Optional[Tensor] = None,
                               scale: Optional[float] = None, backend: Optional[str] = None) -> Tensor:  # fmt: skip
    """Attention of this rank's queries [B, S/P, H, Dh] over the keys of every rank of ``parallel_config``'s
    context-parallel mesh (P = ring x Ulysses degree) -> [B, S/P, H, Dh], through diffusers'
    ``_templated_context_parallel_attention``. ``mask``: a key-padding mask of this rank's keys
    [B, S/P] (Ulysses all-gathers it; Ring cannot carry one: ValueError)."""
    if mask is not None and parallel_config.context_parallel_config.ring_degree > 1:
        raise ValueError("ring attention cannot carry a key-padding mask (each rank's mask covers its own keys "
                         "only); use ulysses_degree for models that mask the sharded sequence")  # fmt: skip
    local = functools.partial(_local_attention, backend=backend)
    return _templated_context_parallel_attention(q, k, v, mask, 0.0, False, scale, False, False, forward_op=local,
                                                 backward_op=_no_backward,
                                                 _parallel_config=parallel_config)  # fmt: skip


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """``softmax(q k^T * scale) v`` and each query row's log-sum-exp of the scaled scores: q [B, Sq, H, Dh],
    k/v [B, Skv, H, Dh] -> out [B, Sq, H, Dh], lse [B, Sq, H], both fp32 (Ring merges partial results in
    fp32). On CUDA in fp16/bf16, PyTorch's flash-attention kernel (which returns the log-sum-exp); else the
    reference math in fp32, [B, H, Sq, Skv] scores at once."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, Dh]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    else:
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        lse = scores.logsumexp(dim=-1)
        out = torch.exp(scores - lse.unsqueeze(-1)) @ v.float()
    return out.float().transpose(1, 2), lse.transpose(1, 2)


def _local_attention(ctx, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                     is_causal: bool, scale: Optional[float], enable_gqa: bool, return_lse: bool,
                     _save_ctx: bool = True, _parallel_config=None, *, backend: Optional[str]):  # fmt: skip
    """The local op in diffusers' forward-op signature: ``joint_attention``, or ``attention_with_lse`` when
    the caller (Ring) needs the log-sum-exp."""
    if return_lse:
        return attention_with_lse(query, key, value, scale)
    return joint_attention(query, key, value, mask=attn_mask, scale=scale, backend=backend)


def _no_backward(ctx, grad_out: Tensor, *args):
    raise NotImplementedError("dit_kernels' context-parallel attention is inference-only (no backward)")
