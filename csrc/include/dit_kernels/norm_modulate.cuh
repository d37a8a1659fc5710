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
//
// Work split: a "team" of TEAM threads owns one row at a time (a warp for D <= 1024, the whole
// 256-thread block above). Each thread handles columns lane, lane + TEAM, ... in every pass, so the
// row it caches in shared memory (fp32, D values per team) is only ever read back by the thread that
// wrote it: passes need no barrier, only the team reductions do. Exact two-pass variance.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dit_kernels/params.h"
#include "dit_kernels/portable.h"

namespace dk {

constexpr int kNormModulateBlock = 256;

template <class T>
DK_DEVICE const T* row_ptr(const RowOperand& op, int64_t row, int64_t seq_len) {
  const int64_t b = row / seq_len;
  const int64_t s = row - b * seq_len;
  return static_cast<const T*>(op.ptr) + b * op.stride_b + s * op.stride_s;
}

// Sum of v over the TEAM threads that share a row. scratch: TEAM / 32 floats per team.
template <int TEAM>
DK_DEVICE float team_sum(float v, float* scratch) {
  v = warp_sum(v);
  if constexpr (TEAM == 32) {
    return v;
  } else {
    const int lane = threadIdx.x % TEAM;
    if (lane % 32 == 0) scratch[lane / 32] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < TEAM / 32; ++w) total += scratch[w];  // same order in every thread
    __syncthreads();                                         // scratch is reused by the next call
    return total;
  }
}

template <class T, int TEAM>
DK_GLOBAL void norm_modulate_kernel(NormModulateParams p) {
  constexpr int kTeams = kNormModulateBlock / TEAM;
  DK_SHARED float scratch[kTeams][TEAM / 32];
  DK_DYNAMIC_SMEM(float, row_cache);  // kTeams * D floats when normalize
  const int team = threadIdx.x / TEAM;
  const int lane = threadIdx.x % TEAM;
  const int64_t D = p.dim;
  float* cache = row_cache + team * D;

  // Rows are uniform within a team, so every team_sum barrier is reached by the whole team (for
  // TEAM == block size the team is the block; for TEAM == 32 team_sum has no block barrier).
  for (int64_t row = int64_t(blockIdx.x) * kTeams + team; row < p.rows; row += int64_t(gridDim.x) * kTeams) {
    const T* x = row_ptr<T>(p.x, row, p.seq_len);
    const T* y = p.y.ptr ? row_ptr<T>(p.y, row, p.seq_len) : nullptr;
    const T* gate = p.gate.ptr ? row_ptr<T>(p.gate, row, p.seq_len) : nullptr;
    float sum = 0.f;
    for (int64_t d = lane; d < D; d += TEAM) {
      float h = to_float(x[d]);
      if (y) {
        const float addend = gate ? to_float(gate[d]) * to_float(y[d]) : to_float(y[d]);
        const T rounded = from_float<T>(h + addend);
        static_cast<T*>(p.h_out)[row * D + d] = rounded;
        h = to_float(rounded);
      }
      if (p.normalize) cache[d] = h;
      sum += h;
    }
    if (!p.normalize) continue;

    const float mean = team_sum<TEAM>(sum, scratch[team]) / float(D);
    float squares = 0.f;
    for (int64_t d = lane; d < D; d += TEAM) {
      const float centred = cache[d] - mean;
      squares += centred * centred;
    }
    const float rstd = dk::rsqrt(team_sum<TEAM>(squares, scratch[team]) / float(D) + p.eps);

    const T* weight = static_cast<const T*>(p.weight);
    const T* bias = static_cast<const T*>(p.bias);
    const T* shift = p.shift.ptr ? row_ptr<T>(p.shift, row, p.seq_len) : nullptr;
    const T* scale = p.scale.ptr ? row_ptr<T>(p.scale, row, p.seq_len) : nullptr;
    T* out = static_cast<T*>(p.out) + row * D;
    for (int64_t d = lane; d < D; d += TEAM) {
      float v = (cache[d] - mean) * rstd;
      if (weight) v *= to_float(weight[d]);
      if (bias) v += to_float(bias[d]);
      if (scale) v *= 1.f + to_float(scale[d]);
      if (shift) v += to_float(shift[d]);
      out[d] = from_float<T>(v);
    }
  }
}

// How a launch is shaped for one problem; shared by the CUDA launcher and the CPU emulation.
struct LaunchShape {
  int team;             // 32 or kNormModulateBlock
  int64_t grid;         // blocks
  size_t dynamic_smem;  // bytes
};

inline LaunchShape norm_modulate_shape(const NormModulateParams& p, int64_t max_grid) {
  LaunchShape shape;
  shape.team = p.dim <= 1024 ? 32 : kNormModulateBlock;
  const int64_t teams = kNormModulateBlock / shape.team;
  const int64_t needed = (p.rows + teams - 1) / teams;
  shape.grid = needed < max_grid ? needed : max_grid;
  shape.dynamic_smem = p.normalize ? size_t(teams * p.dim) * sizeof(float) : 0;
  return shape;
}

constexpr size_t kMaxDynamicSmem = 48 * 1024;  // no opt-in: D <= 12288 (the Python side checks first)

}  // namespace dk
