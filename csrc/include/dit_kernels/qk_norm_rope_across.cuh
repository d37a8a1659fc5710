// QK norm over each token's whole projection (all heads together) + per-head RoPE, written into (joint)
// destination buffers, V copied along: the CUDA kernel body of qk_norm_rope(across_heads=True).
//
// Compiled twice from this one source, as qk_norm_rope.cuh: by nvcc into dit_kernels._C and by g++ into
// dit_kernels._C_cpu through the CPU emulation. The math is the spec `_reference_slot(across_heads=True)` in
// dit_kernels/ops/qk_norm_rope.py (all arithmetic in fp32, one rounding to T at the store), per token
// x = the H * Dh values of one (b, s) of a slot (Wan's RMSNorm(heads * head_dim)):
//
//   rms:    n = x * rstd * weight + bias,           rstd = 1 / sqrt(mean(x^2) + eps)     over H * Dh
//   layer:  n = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(mean((x - mean)^2) + eps)  (two-pass)
//   none:   n = x
//   out[h, d] = n[h, d] * cos[r, d] + sign(d) * n[h, partner(d)] * sin[r, d],   r = rope_offset + s
//
// weight / bias are [H * Dh] (read only when normalising); partner / sign as in qk_norm_rope.cuh.
//
// Work split: grid (token blocks, n_slots), blockIdx.y picks the slot; a warp owns one token at a time (8
// per 256-thread block, grid-stride), its lanes striding over Dh head by head. A token of Wan 14B holds
// 5120 values, more than a warp keeps in registers, so each pass (mean, squares, output) re-reads it from
// global memory / L1 instead: no shared memory, no barrier, scalar accesses, all offsets 64-bit.
#pragma once

#include <cstdint>

#include "dit_kernels/params.h"
#include "dit_kernels/portable.h"

namespace dk {

constexpr int kQkNormRopeAcrossBlock = 256;
constexpr int kQkNormRopeAcrossTokensPerBlock = kQkNormRopeAcrossBlock / kWarpSize;  // one token per warp

template <class T>
DK_GLOBAL void DK_LAUNCH_BOUNDS(kQkNormRopeAcrossBlock) qk_norm_rope_across_kernel(QkNormRopeParams p) {
  const QkNormRopeSlot& slot = p.slot[blockIdx.y];
  if (slot.src == nullptr) return;  // absent slot: the whole block leaves together
  const int warp = int(threadIdx.x) / kWarpSize;
  const int lane = int(threadIdx.x) % kWarpSize;
  const int D = int(p.head_dim);  // <= kQkNormRopeMaxHeadDim: column indices stay 32-bit
  const int half_dim = D / 2;
  const int64_t heads = p.heads;
  const int64_t seq_len = slot.seq_len;
  const int64_t tokens = p.batch * seq_len;
  const float count = float(heads * D);
  const int norm = slot.normalize ? p.norm : 0;
  const T* weight = norm != 0 ? static_cast<const T*>(slot.weight) : nullptr;
  const T* bias = norm != 0 ? static_cast<const T*>(slot.bias) : nullptr;

  for (int64_t token = int64_t(blockIdx.x) * kQkNormRopeAcrossTokensPerBlock + warp; token < tokens;
       token += int64_t(gridDim.x) * kQkNormRopeAcrossTokensPerBlock) {
    const int64_t s = token % seq_len;
    const int64_t b = token / seq_len;
    const T* x = static_cast<const T*>(slot.src) + b * slot.src_sb + s * slot.src_ss;
    T* out = static_cast<T*>(slot.dst) + b * slot.dst_sb + s * slot.dst_ss;

    // Token statistics: n = (x - mean) * rstd covers all three norms (mean 0 for rms; 0 and 1 for none).
    float mean = 0.f;
    float rstd = 1.f;
    if (norm == 2) {
      float sum = 0.f;
      for (int64_t h = 0; h < heads; ++h) {
        for (int d = lane; d < D; d += kWarpSize) sum += to_float(x[h * slot.src_sh + d]);
      }
      mean = warp_sum(sum) / count;
    }
    if (norm != 0) {
      float squares = 0.f;
      for (int64_t h = 0; h < heads; ++h) {
        for (int d = lane; d < D; d += kWarpSize) {
          const float centred = to_float(x[h * slot.src_sh + d]) - mean;
          squares += centred * centred;
        }
      }
      rstd = dk::rsqrt(warp_sum(squares) / count + p.eps);
    }

    const float* cos_row = slot.rotate ? p.cos + (p.rope_offset + s) * p.rope_stride : nullptr;
    const float* sin_row = slot.rotate ? p.sin + (p.rope_offset + s) * p.rope_stride : nullptr;
    for (int64_t h = 0; h < heads; ++h) {
      const T* xh = x + h * slot.src_sh;
      T* oh = out + h * slot.dst_sh;
      const T* wh = weight ? weight + h * D : nullptr;
      const T* bh = bias ? bias + h * D : nullptr;
      for (int d = lane; d < D; d += kWarpSize) {
        float v = (to_float(xh[d]) - mean) * rstd;
        if (wh) v *= to_float(wh[d]);
        if (bh) v += to_float(bh[d]);
        if (slot.rotate) {
          const bool first = p.rope_half ? d < half_dim : (d & 1) == 0;  // the element that takes -partner
          const int partner = p.rope_half ? (first ? d + half_dim : d - half_dim) : (d ^ 1);
          float vp = (to_float(xh[partner]) - mean) * rstd;
          if (wh) vp *= to_float(wh[partner]);
          if (bh) vp += to_float(bh[partner]);
          v = v * cos_row[d] + (first ? -vp : vp) * sin_row[d];
        }
        oh[d] = from_float<T>(v);
      }
    }
  }
}

// Blocks along x for p (tokens of the longest slot, 8 per block), at most max_grid; 0 = nothing to do.
inline int64_t qk_norm_rope_across_grid(const QkNormRopeParams& p, int64_t max_grid) {
  int64_t tokens = 0;
  for (int i = 0; i < p.n_slots; ++i) {
    const int64_t slot_tokens = p.slot[i].src ? p.batch * p.slot[i].seq_len : 0;
    tokens = slot_tokens > tokens ? slot_tokens : tokens;
  }
  const int64_t needed = (tokens + kQkNormRopeAcrossTokensPerBlock - 1) / kQkNormRopeAcrossTokensPerBlock;
  return needed < max_grid ? needed : max_grid;
}

}  // namespace dk
