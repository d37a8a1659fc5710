// Per-head QK norm + RoPE, written into (joint) destination buffers, V copied along: the CUDA kernel body.
//
// Compiled twice from this one source: by nvcc into dit_kernels._C (csrc/qk_norm_rope.cu) and by g++
// into dit_kernels._C_cpu through the thread-per-CUDA-thread emulator (csrc/cpu_emulation/). The math
// is the spec `_reference_slot` in dit_kernels/ops/qk_norm_rope.py (all arithmetic in fp32, one rounding
// to T at the store), per row x = one head vector of Dh values:
//
//   rms:    n = x * rstd * weight + bias,           rstd = 1 / sqrt(mean(x^2) + eps)
//   layer:  n = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(mean((x - mean)^2) + eps)  (two-pass)
//   none:   n = x                                   (weight / bias are read only when normalising)
//   out[d]  = n[d] * cos[r, d] + sign(d) * n[partner(d)] * sin[r, d],   r = rope_offset + s  (rotate)
//
// partner / sign: interleaved pairs (x0, x1) -> (-x1, x0): partner d ^ 1, sign - on even d; half layout
// (a, b) -> (-b, a): partner d +- Dh/2, sign - on the first half. The partner is normalised (and
// weighted / biased) with the row's own statistics before the rotation, exactly as the reference does.
//
// Work split: grid (row blocks, n_slots); blockIdx.y picks the slot (q, k or v), so one launch serves
// all three, and each slot has its own sequence length. A warp owns one (b, s, h) row at a time, 8 rows
// per 256-thread block, grid-stride over rows (rows are warp-uniform, so every shuffle is reached by the
// full warp). Lanes stride over Dh (any Dh works; the binding takes Dh <= kQkNormRopeMaxHeadDim, see
// params.h) and re-read the row and the partner from global memory / L1 in each pass instead of caching
// them: no shared memory, no __syncthreads, no per-thread arrays. All offsets are 64-bit.
#pragma once

#include <cstdint>

#include "dit_kernels/params.h"
#include "dit_kernels/portable.h"

namespace dk {

constexpr int kQkNormRopeBlock = 256;
constexpr int kQkNormRopeRowsPerBlock = kQkNormRopeBlock / kWarpSize;  // one row per warp

template <class T>
DK_GLOBAL void qk_norm_rope_kernel(QkNormRopeParams p) {
  const QkNormRopeSlot& slot = p.slot[blockIdx.y];
  if (slot.src == nullptr) return;  // absent slot: the whole block leaves together
  const int warp = int(threadIdx.x) / kWarpSize;
  const int lane = int(threadIdx.x) % kWarpSize;
  const int D = int(p.head_dim);  // <= kQkNormRopeMaxHeadDim: column indices stay 32-bit
  const int half_dim = D / 2;
  const int64_t heads = p.heads;
  const int64_t seq_len = slot.seq_len;
  const int64_t rows = p.batch * seq_len * heads;
  const int norm = slot.normalize ? p.norm : 0;
  const T* weight = norm != 0 ? static_cast<const T*>(slot.weight) : nullptr;
  const T* bias = norm != 0 ? static_cast<const T*>(slot.bias) : nullptr;
  const bool rotate = slot.rotate;
  const bool half_layout = p.rope_half;

  for (int64_t row = int64_t(blockIdx.x) * kQkNormRopeRowsPerBlock + warp; row < rows;
       row += int64_t(gridDim.x) * kQkNormRopeRowsPerBlock) {
    const int64_t h = row % heads;
    const int64_t bs = row / heads;
    const int64_t s = bs % seq_len;
    const int64_t b = bs / seq_len;
    const T* x = static_cast<const T*>(slot.src) + b * slot.src_sb + s * slot.src_ss + h * slot.src_sh;
    T* out = static_cast<T*>(slot.dst) + b * slot.dst_sb + s * slot.dst_ss + h * slot.dst_sh;

    // Row statistics: n = (x - mean) * rstd covers all three norms (mean 0 for rms; 0 and 1 for none,
    // which leave x bit-exact).
    float mean = 0.f;
    float rstd = 1.f;
    if (norm == 2) {
      float sum = 0.f;
      for (int d = lane; d < D; d += kWarpSize) sum += to_float(x[d]);
      mean = warp_sum(sum) / float(D);
    }
    if (norm != 0) {
      float squares = 0.f;
      for (int d = lane; d < D; d += kWarpSize) {
        const float centred = to_float(x[d]) - mean;
        squares += centred * centred;
      }
      rstd = dk::rsqrt(warp_sum(squares) / float(D) + p.eps);
    }

    const float* cos_row = rotate ? p.cos + (p.rope_offset + s) * int64_t(D) : nullptr;
    const float* sin_row = rotate ? p.sin + (p.rope_offset + s) * int64_t(D) : nullptr;
    for (int d = lane; d < D; d += kWarpSize) {
      float v = (to_float(x[d]) - mean) * rstd;
      if (weight) v *= to_float(weight[d]);
      if (bias) v += to_float(bias[d]);
      if (rotate) {
        const bool first = half_layout ? d < half_dim : (d & 1) == 0;  // the element that takes -partner
        const int partner = half_layout ? (first ? d + half_dim : d - half_dim) : (d ^ 1);
        float vp = (to_float(x[partner]) - mean) * rstd;
        if (weight) vp *= to_float(weight[partner]);
        if (bias) vp += to_float(bias[partner]);
        const float sn = sin_row[d];
        v = v * cos_row[d] + (first ? -vp : vp) * sn;
      }
      out[d] = from_float<T>(v);
    }
  }
}

// Blocks along x for p (rows of the longest slot, 8 per block), at most max_grid; 0 = nothing to do.
inline int64_t qk_norm_rope_grid(const QkNormRopeParams& p, int64_t max_grid) {
  int64_t rows = 0;
  for (int i = 0; i < p.n_slots; ++i) {
    const int64_t slot_rows = p.slot[i].src ? p.batch * p.slot[i].seq_len * p.heads : 0;
    rows = slot_rows > rows ? slot_rows : rows;
  }
  const int64_t needed = (rows + kQkNormRopeRowsPerBlock - 1) / kQkNormRopeRowsPerBlock;
  return needed < max_grid ? needed : max_grid;
}

}  // namespace dk
