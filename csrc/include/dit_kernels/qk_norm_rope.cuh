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
//   (table row r at r * rope_stride floats: rope_stride 0 broadcasts one row over the sequence)
//
// partner / sign: interleaved pairs (x0, x1) -> (-x1, x0): partner d ^ 1, sign - on even d; half layout
// (a, b) -> (-b, a): partner d +- Dh/2, sign - on the first half. The partner is normalised (and
// weighted / biased) with the row's own statistics before the rotation, exactly as the reference does.
//
// Work split (row_team.cuh): grid (row blocks, n_slots); blockIdx.y picks the slot (q, k or v), so one
// launch serves all three, and each slot has its own sequence length. A team of 1 ... 32 lanes (within
// one warp) owns one (b, s, h) row at a time: the smallest team that keeps at most 16 values per lane,
// 256 / team rows per block, grid-stride over rows. The row is read once (16-byte chunks on the vector
// path) into registers; statistics are team_sum shuffles (no barrier). The RoPE partner of the
// interleaved layout (d ^ 1) is in the same chunk; for the half layout (d +- Dh/2, another lane's chunk)
// the team stages its normalised row in shared memory between two __syncwarp. All offsets are 64-bit.
// Sources must not overlap destinations (pointers are __restrict__).
#pragma once

#include <cstddef>
#include <cstdint>

#include "dit_kernels/params.h"
#include "dit_kernels/portable.h"
#include "dit_kernels/row_team.cuh"

namespace dk {

constexpr int kQkNormRopeBlock = 256;
constexpr int kQkNormRopeMaxFloats = int(kQkNormRopeMaxHeadDim / kWarpSize);  // 16 per lane: teams <= 32

template <class T>
constexpr int kQkNormRopeMaxChunks = kQkNormRopeMaxFloats / kChunk<T>;

// One launch: team = 1 << team_log2 lanes per row; dynamic shared memory rows_per_block * Dh floats when
// a slot rotates in the half layout (qk_norm_rope_launch).
template <class T, bool VECTOR>
DK_GLOBAL void DK_LAUNCH_BOUNDS(kQkNormRopeBlock) qk_norm_rope_kernel(QkNormRopeParams p, int team_log2) {
  using Chunks = RowChunks<T, kQkNormRopeMaxChunks<T>, VECTOR>;
  constexpr int N = Chunks::N;
  const QkNormRopeSlot& slot = p.slot[blockIdx.y];
  if (slot.src == nullptr) return;  // absent slot: the whole block leaves together
  const int team = 1 << team_log2;
  const int lane = int(threadIdx.x) & (team - 1);
  const int team_id = int(threadIdx.x) >> team_log2;
  const int64_t rows_per_block = kQkNormRopeBlock >> team_log2;
  const int D = int(p.head_dim);  // <= kQkNormRopeMaxHeadDim: column indices stay 32-bit
  const int half_dim = D / 2;
  const int64_t heads = p.heads;
  const int64_t seq_len = slot.seq_len;
  const int64_t rows = p.batch * seq_len * heads;
  const int norm = slot.normalize ? p.norm : 0;
  const bool half_layout = p.rope_half;
  DK_DYNAMIC_SMEM(float, staging);
  float* __restrict__ staged = staging + team_id * D;  // this team's row (half layout only)

  // Every lane runs every iteration (team_sum and __syncwarp need the whole warp); a team whose row is
  // past the end owns no chunk.
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t team_row = first + team_id;
    const int64_t row = team_row < rows ? team_row : rows - 1;  // in bounds; not accessed when past the end
    const Chunks chunks{lane, team, team_row < rows ? (D + N - 1) / N : 0, D};
    const int64_t h = row % heads;
    const int64_t bs = row / heads;
    const int64_t s = bs % seq_len;
    const int64_t b = bs / seq_len;
    typename Chunks::Values n;  // the row, then its normalised values
    chunks.load(static_cast<const T*>(slot.src) + b * slot.src_sb + s * slot.src_ss + h * slot.src_sh, n);

    if (norm != 0) {  // n = (x - mean) * rstd * weight + bias; mean = 0 for rms, two-pass for layer
      const float mean = norm == 2 ? team_sum<kWarpSize>(chunks.sum(n), team, nullptr) / float(D) : 0.f;
      const float squares = team_sum<kWarpSize>(chunks.sum_squares(n, mean), team, nullptr);
      const float rstd = dk::rsqrt(squares / float(D) + p.eps);
      DK_UNROLL
      for (int i = 0; i < Chunks::kMax; ++i) {
        DK_UNROLL
        for (int j = 0; j < N; ++j) n[i][j] = (n[i][j] - mean) * rstd;
      }
      if (slot.weight) chunks.combine(static_cast<const T*>(slot.weight), n, [](float v, float w) { return v * w; });
      if (slot.bias) chunks.combine(static_cast<const T*>(slot.bias), n, [](float v, float c) { return v + c; });
    }

    T* __restrict__ out = static_cast<T*>(slot.dst) + b * slot.dst_sb + s * slot.dst_ss + h * slot.dst_sh;
    if (!slot.rotate) {
      chunks.store(out, n);
      continue;
    }

    // out[d] = n[d] * cos[d] + sign(d) * n[partner(d)] * sin[d]
    if (half_layout) {  // the partner d +- Dh/2 is in another lane's chunk: stage the row
      DK_UNROLL
      for (int i = 0; i < Chunks::kMax; ++i) {
        DK_UNROLL
        for (int j = 0; j < N; ++j) {
          if (chunks.holds(i, j)) staged[chunks.start(i) + j] = n[i][j];
        }
      }
      __syncwarp();
    }
    typename Chunks::Values rotated;  // sign(d) * n[partner(d)]
    DK_UNROLL
    for (int i = 0; i < Chunks::kMax; ++i) {
      DK_UNROLL
      for (int j = 0; j < N; ++j) {
        const int d = int(chunks.start(i)) + j;
        const bool takes_minus = half_layout ? d < half_dim : (j & 1) == 0;  // chunks start at an even d
        float partner = n[i][j ^ 1];
        if (half_layout) partner = chunks.holds(i, j) ? staged[takes_minus ? d + half_dim : d - half_dim] : 0.f;
        rotated[i][j] = takes_minus ? -partner : partner;
      }
    }
    if (half_layout) __syncwarp();  // the next row overwrites `staged`
    const int64_t table_row = (p.rope_offset + s) * p.rope_stride;  // stride 0: one row, broadcast
    chunks.combine(p.cos + table_row, n, [](float v, float c) { return v * c; });
    chunks.combine(p.sin + table_row, rotated, [](float r, float sn) { return r * sn; });
    DK_UNROLL
    for (int i = 0; i < Chunks::kMax; ++i) {
      DK_UNROLL
      for (int j = 0; j < N; ++j) n[i][j] += rotated[i][j];
    }
    chunks.store(out, n);
  }
}

// How a launch is shaped; shared by the CUDA launcher and the CPU emulation.
struct QkNormRopeLaunch {
  bool vector;          // the 16-byte path: all pointers and strides 16-byte aligned, Dh a multiple of kChunk<T>
  int team_log2;        // lanes per row = 1 << team_log2
  int64_t grid;         // blocks along x (rows of the longest slot); 0 = nothing to do
  std::size_t dynamic_smem;  // bytes: the half layout's staged rows
};

template <class T>
QkNormRopeLaunch qk_norm_rope_launch(const QkNormRopeParams& p, int64_t max_grid) {
  QkNormRopeLaunch shape;
  const std::size_t e = sizeof(T);
  shape.vector = p.head_dim % kChunk<T> == 0 && aligned16(p.cos, sizeof(float), p.rope_stride) &&
                 aligned16(p.sin, sizeof(float), p.rope_stride);
  int64_t rows = 0;
  bool staging = false;
  for (int i = 0; i < p.n_slots; ++i) {
    const QkNormRopeSlot& slot = p.slot[i];
    if (slot.src == nullptr) continue;
    const int64_t slot_rows = p.batch * slot.seq_len * p.heads;
    rows = slot_rows > rows ? slot_rows : rows;
    staging = staging || (slot.rotate && p.rope_half);
    const bool affine = slot.normalize && p.norm != 0;
    shape.vector = shape.vector && aligned16(slot.src, e, slot.src_sb, slot.src_ss, slot.src_sh) &&
                   aligned16(slot.dst, e, slot.dst_sb, slot.dst_ss, slot.dst_sh) &&
                   (!affine || (aligned16(slot.weight, e) && aligned16(slot.bias, e)));
  }
  const int64_t chunks = (p.head_dim + kChunk<T> - 1) / kChunk<T>;
  shape.team_log2 = team_log2_for(chunks, kQkNormRopeMaxChunks<T>, kWarpSize);
  const int64_t rows_per_block = kQkNormRopeBlock >> shape.team_log2;
  const int64_t needed = (rows + rows_per_block - 1) / rows_per_block;
  shape.grid = needed < max_grid ? needed : max_grid;
  shape.dynamic_smem = staging ? std::size_t(rows_per_block * p.head_dim) * sizeof(float) : 0;
  return shape;
}

}  // namespace dk
