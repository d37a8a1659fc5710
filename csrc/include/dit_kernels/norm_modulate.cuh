// LayerNorm + adaLN modulate, gated residual, and their fusion: the CUDA kernel body.
//
// Compiled twice from this one source: by nvcc into dit_kernels._C (csrc/norm_modulate.cu) and by g++
// into dit_kernels._C_cpu through the thread-per-CUDA-thread emulator (csrc/cpu_emulation/). The math
// is the spec in dit_kernels/ops/norm_modulate.py (all arithmetic in fp32, one rounding per output):
//
//   h   = x + gate * y                      (when y is given; stored rounded, then read back rounded)
//   out = ((h - mean) * rstd * weight + bias) * (1 + scale) + shift,   rstd = 1 / sqrt(var + eps)
//
// Layout: every row operand is [B, S, D] with a unit last stride and (stride_b, stride_s) in elements,
// so broadcast modulation ([B, D] -> stride_s = 0) and strided views need no copy. Outputs are dense.
// Inputs must not overlap the outputs (pointers are __restrict__).
//
// Work split (row_team.cuh): a team of 1 ... 512 threads per row, the smallest that keeps at most
// kNormModulateMaxFloats (24) values per thread, so a normalised row lives in registers between its
// passes: x (and y, gate) are read once, h and out written once, each chunk with one 16-byte access on
// the vector path, each operand's loads issued together. Blocks of max(256, team) threads. Row
// statistics: exact two-pass mean / variance in fp32, each a team_sum (shuffles; teams above a warp add
// one barrier per sum: 2 barriers per row, none for teams <= 32). The gated residual alone (normalize =
// false) goes over the row in rounds of that size and has no D limit.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "dit_kernels/params.h"
#include "dit_kernels/portable.h"
#include "dit_kernels/row_team.cuh"

namespace dk {

constexpr int kNormModulateMinBlock = 256;
constexpr int kNormModulateMaxBlock = 512;  // the largest team: D <= 24 * 512 when normalising
constexpr int kNormModulateMaxFloats = 24;  // row values per thread, in registers
static_assert(kNormModulateMaxDim <= int64_t(kNormModulateMaxFloats) * kNormModulateMaxBlock);

template <class T>
constexpr int kNormModulateMaxChunks = kNormModulateMaxFloats / kChunk<T>;

template <class T>
DK_DEVICE const T* row_ptr(const RowOperand& op, int64_t row, int64_t seq_len) {
  const int64_t b = row / seq_len;
  const int64_t s = row - b * seq_len;
  return static_cast<const T*>(op.ptr) + b * op.stride_b + s * op.stride_s;
}

// h = x (+ gate * y, rounded to T and stored to h_out, then read back) on the thread's chunks.
template <class T, class Chunks>
DK_DEVICE void residual(const Chunks& chunks, const T* __restrict__ x, const T* __restrict__ y,
                        const T* __restrict__ gate, T* __restrict__ h_out, typename Chunks::Values& h) {
  chunks.load(x, h);
  if (y == nullptr) return;
  typename Chunks::Values addend;
  chunks.load(y, addend);
  if (gate != nullptr) chunks.combine(gate, addend, [](float a, float g) { return g * a; });
  DK_UNROLL
  for (int i = 0; i < Chunks::kMax; ++i) {
    DK_UNROLL
    for (int j = 0; j < Chunks::N; ++j) h[i][j] = to_float(from_float<T>(h[i][j] + addend[i][j]));
  }
  chunks.store(h_out, h);
}

// One launch: team = 1 << team_log2 threads per row, blockDim.x = max(kNormModulateMinBlock, team).
template <class T, bool VECTOR>
DK_GLOBAL void DK_LAUNCH_BOUNDS(kNormModulateMaxBlock) norm_modulate_kernel(NormModulateParams p, int team_log2) {
  using Chunks = RowChunks<T, kNormModulateMaxChunks<T>, VECTOR>;
  DK_SHARED float scratch[2][kNormModulateMaxBlock / kWarpSize];  // mean, then variance: see team_sum
  const int team = 1 << team_log2;
  const int lane = int(threadIdx.x) & (team - 1);
  const int64_t rows_per_block = int64_t(blockDim.x) >> team_log2;
  const int64_t D = p.dim;
  const int64_t row_chunks = (D + Chunks::N - 1) / Chunks::N;

  // Every thread runs every iteration (the team_sum calls need the whole block); a thread whose row is
  // past the end owns no chunk and only joins the reductions.
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < p.rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t team_row = first + (int64_t(threadIdx.x) >> team_log2);
    const int64_t row = team_row < p.rows ? team_row : p.rows - 1;  // in bounds; not accessed when past the end
    const Chunks chunks{lane, team, team_row < p.rows ? row_chunks : 0, D};
    const T* __restrict__ x = row_ptr<T>(p.x, row, p.seq_len);
    const T* __restrict__ y = p.y.ptr ? row_ptr<T>(p.y, row, p.seq_len) : nullptr;
    const T* __restrict__ gate = p.gate.ptr ? row_ptr<T>(p.gate, row, p.seq_len) : nullptr;
    T* __restrict__ h_out = p.h_out ? static_cast<T*>(p.h_out) + row * D : nullptr;
    typename Chunks::Values h;

    if (!p.normalize) {  // the gated residual alone: any D, in rounds of kMax chunks per thread
      for (Chunks round = chunks; round.first < round.end; round.first += int64_t(Chunks::kMax) * team)
        residual(round, x, y, gate, h_out, h);
      continue;
    }

    residual(chunks, x, y, gate, h_out, h);  // the whole row (D <= kNormModulateMaxDim)
    const float mean = team_sum<kNormModulateMaxBlock>(chunks.sum(h), team, scratch[0]) / float(D);
    const float squares = team_sum<kNormModulateMaxBlock>(chunks.sum_squares(h, mean), team, scratch[1]);
    const float rstd = dk::rsqrt(squares / float(D) + p.eps);
    DK_UNROLL
    for (int i = 0; i < Chunks::kMax; ++i) {
      DK_UNROLL
      for (int j = 0; j < Chunks::N; ++j) h[i][j] = (h[i][j] - mean) * rstd;
    }
    if (p.weight) chunks.combine(static_cast<const T*>(p.weight), h, [](float v, float w) { return v * w; });
    if (p.bias) chunks.combine(static_cast<const T*>(p.bias), h, [](float v, float b) { return v + b; });
    if (p.scale.ptr) {
      chunks.combine(row_ptr<T>(p.scale, row, p.seq_len), h, [](float v, float sc) { return v * (1.f + sc); });
    }
    if (p.shift.ptr) chunks.combine(row_ptr<T>(p.shift, row, p.seq_len), h, [](float v, float sh) { return v + sh; });
    chunks.store(static_cast<T*>(p.out) + row * D, h);
  }
}

// How a launch is shaped for one problem; shared by the CUDA launcher and the CPU emulation.
struct NormModulateLaunch {
  bool vector;    // the 16-byte path: every operand and row stride 16-byte aligned, D a multiple of kChunk<T>
  int team_log2;  // threads per row = 1 << team_log2
  int block;      // threads per block: max(kNormModulateMinBlock, team)
  int64_t grid;   // blocks
};

template <class T>
NormModulateLaunch norm_modulate_launch(const NormModulateParams& p, int64_t max_grid) {
  NormModulateLaunch shape;
  const std::size_t e = sizeof(T);
  const auto operand_ok = [&](const RowOperand& op) { return aligned16(op.ptr, e, op.stride_b, op.stride_s); };
  shape.vector = p.dim % kChunk<T> == 0 && aligned16(p.out, e) && aligned16(p.h_out, e) && operand_ok(p.x) &&
                 operand_ok(p.y) && operand_ok(p.gate) && operand_ok(p.shift) && operand_ok(p.scale) &&
                 aligned16(p.weight, e) && aligned16(p.bias, e);
  const int64_t chunks = (p.dim + kChunk<T> - 1) / kChunk<T>;
  shape.team_log2 = team_log2_for(chunks, kNormModulateMaxChunks<T>, kNormModulateMaxBlock);
  shape.block = std::max(kNormModulateMinBlock, 1 << shape.team_log2);
  const int64_t rows_per_block = shape.block >> shape.team_log2;
  const int64_t needed = (p.rows + rows_per_block - 1) / rows_per_block;
  shape.grid = needed < max_grid ? needed : max_grid;
  return shape;
}

}  // namespace dk
