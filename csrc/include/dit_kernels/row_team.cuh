// Rows owned by teams of threads, read and written in 16-byte chunks: the work split shared by the
// norm_modulate and qk_norm_rope kernels (portable: nvcc and the CPU emulation).
//
// A team is a power-of-two number of consecutive threads of a block (1 ... block size) that owns one
// row at a time; a block holds block / team rows. A row of `dim` elements of T is cut into chunks of
// kChunk<T> = 16 / sizeof(T) elements (8 bf16 / half, 4 float), and lane l of a team owns chunks
// l, l + team, l + 2 team, ... (at most MAX_CHUNKS per thread, kept in registers). Two access paths,
// chosen per launch on the host (see `aligned16`):
//   vector (VECTOR = true): one 16-byte load or store per chunk (LDG.E.128 / STG.E.128); needs every
//     pointer and row stride 16-byte aligned and dim a multiple of kChunk<T>;
//   scalar (VECTOR = false): element by element, any alignment; the last chunk may be partial.
// Both paths give each thread the same elements in the same order, so they give the same bits.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dit_kernels/params.h"
#include "dit_kernels/portable.h"

namespace dk {

template <class T>
constexpr int kChunk = int(16 / sizeof(T));

// ---- host side: choosing the path and the team -------------------------------------------------------

// True when address and every stride (in elements of elem_bytes) keep 16-byte alignment (nullptr: true).
inline bool aligned16(const void* address, std::size_t elem_bytes, int64_t stride_a = 0, int64_t stride_b = 0,
                      int64_t stride_c = 0) {
  const auto bytes = [&](int64_t stride) { return (stride * int64_t(elem_bytes)) % 16 == 0; };
  return address == nullptr ||
         (reinterpret_cast<std::uintptr_t>(address) % 16 == 0 && bytes(stride_a) && bytes(stride_b) && bytes(stride_c));
}

// log2 of the smallest power-of-two team (at most max_team threads) in which no thread owns more than
// max_chunks of a row's `chunks` chunks; max_team when even that team cannot (the caller then loops).
inline int team_log2_for(int64_t chunks, int max_chunks, int max_team) {
  int log2 = 0;
  while ((int64_t(1) << log2) * max_chunks < chunks && (1 << log2) < max_team) ++log2;
  return log2;
}

// ---- device side -------------------------------------------------------------------------------------

// The N elements of src at d0 .. d0 + N - 1 as floats. VECTOR: N * sizeof(S) / 16 aligned 16-byte
// loads. Scalar: elements at or past `dim` read as 0 (never touched).
template <bool VECTOR, int N, class S>
DK_DEVICE void load_chunk(const S* __restrict__ src, int64_t d0, int64_t dim, float (&out)[N]) {
  if constexpr (VECTOR) {
    constexpr int kPer = Pack16<S>::kSize;
    static_assert(N % kPer == 0, "a vector chunk is a whole number of 16-byte packs");
    DK_UNROLL
    for (int k = 0; k < N / kPer; ++k) {
      const Pack16<S> pack = load16(src + d0 + k * kPer);
      DK_UNROLL
      for (int j = 0; j < kPer; ++j) out[k * kPer + j] = to_float(pack.v[j]);
    }
  } else {
    DK_UNROLL
    for (int j = 0; j < N; ++j) out[j] = d0 + j < dim ? to_float(src[d0 + j]) : 0.f;
  }
}

// Rounds the N floats to T and writes them at d0 .. d0 + N - 1 (scalar: only those before `dim`).
template <bool VECTOR, int N, class T>
DK_DEVICE void store_chunk(T* __restrict__ dst, int64_t d0, int64_t dim, const float (&in)[N]) {
  if constexpr (VECTOR) {
    constexpr int kPer = Pack16<T>::kSize;
    static_assert(N % kPer == 0, "a vector chunk is a whole number of 16-byte packs");
    DK_UNROLL
    for (int k = 0; k < N / kPer; ++k) {
      Pack16<T> pack;
      DK_UNROLL
      for (int j = 0; j < kPer; ++j) pack.v[j] = from_float<T>(in[k * kPer + j]);
      store16(dst + d0 + k * kPer, pack);
    }
  } else {
    DK_UNROLL
    for (int j = 0; j < N; ++j) {
      if (d0 + j < dim) dst[d0 + j] = from_float<T>(in[j]);
    }
  }
}

// One thread's chunks of a row: chunk i (0 <= i < MAX_CHUNKS) is the row's chunk first + i * team, held
// in registers as v[i][0 .. kChunk<T>). Operations run operand by operand over all of the thread's
// chunks, so the loads of one operand are independent and in flight together, and every store comes
// after the loads it depends on.
template <class T, int MAX_CHUNKS, bool VECTOR>
struct RowChunks {
  static constexpr int N = kChunk<T>;
  static constexpr int kMax = MAX_CHUNKS;
  using Values = float[MAX_CHUNKS][N];

  int64_t first;  // this thread's first chunk: its lane (plus the round's offset)
  int team;       // threads per row
  int64_t end;    // chunks of the row (0 for a team whose row is past the end: it owns nothing)
  int64_t dim;    // elements of the row

  DK_DEVICE bool owns(int i) const { return first + int64_t(i) * team < end; }
  DK_DEVICE int64_t start(int i) const { return (first + int64_t(i) * team) * N; }
  // The element of chunk i at j is in the row (always on the vector path).
  DK_DEVICE bool holds(int i, int j) const { return owns(i) && (VECTOR || start(i) + j < dim); }

  // v = the row's chunks (S: T or the float tables), 0 where not held.
  template <class S>
  DK_DEVICE void load(const S* __restrict__ row, Values& v) const {
    DK_UNROLL
    for (int i = 0; i < MAX_CHUNKS; ++i) {
      if (owns(i)) {
        load_chunk<VECTOR>(row, start(i), dim, v[i]);
      } else {
        DK_UNROLL
        for (int j = 0; j < N; ++j) v[i][j] = 0.f;
      }
    }
  }

  // v[i][j] = op(v[i][j], row element) on every owned chunk.
  template <class S, class Op>
  DK_DEVICE void combine(const S* __restrict__ row, Values& v, Op op) const {
    Values operand;
    load(row, operand);
    DK_UNROLL
    for (int i = 0; i < MAX_CHUNKS; ++i) {
      DK_UNROLL
      for (int j = 0; j < N; ++j) v[i][j] = op(v[i][j], operand[i][j]);
    }
  }

  // Rounds v to T into the row's owned chunks.
  DK_DEVICE void store(T* __restrict__ row, const Values& v) const {
    DK_UNROLL
    for (int i = 0; i < MAX_CHUNKS; ++i) {
      if (owns(i)) store_chunk<VECTOR>(row, start(i), dim, v[i]);
    }
  }

  // This thread's part of the row sum of v and of the squared deviations sum((v - mean)^2), in chunk
  // order over the held elements.
  DK_DEVICE float sum(const Values& v) const { return sum_centred<false>(v, 0.f); }
  DK_DEVICE float sum_squares(const Values& v, float mean) const { return sum_centred<true>(v, mean); }

 private:
  template <bool SQUARES>
  DK_DEVICE float sum_centred(const Values& v, float mean) const {
    float total = 0.f;
    DK_UNROLL
    for (int i = 0; i < MAX_CHUNKS; ++i) {
      DK_UNROLL
      for (int j = 0; j < N; ++j) {
        const float centred = v[i][j] - mean;
        if (holds(i, j)) total += SQUARES ? centred * centred : v[i][j];
      }
    }
    return total;
  }
};

// Sum of v over the team of the calling thread (team <= MAX_TEAM); every thread of the team gets the same
// bits. All threads of the block call it together. Teams of up to 32 threads: a shuffle butterfly inside
// their warp, no barrier. Larger teams: the warp sums meet in `scratch` (block / 32 floats) after one
// __syncthreads, and every thread adds its team's in warp order. The caller must not write `scratch`
// again before a later barrier (alternate two scratch arrays between consecutive calls: the second call's
// barrier orders the first call's reads before the next write).
template <int MAX_TEAM>
DK_DEVICE float team_sum(float v, int team, float* scratch) {
  const int width = team < kWarpSize ? team : kWarpSize;
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (MAX_TEAM <= kWarpSize || team <= kWarpSize) return v;
  const int warp = int(threadIdx.x) / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = team / kWarpSize, first = warp - warp % warps;
  float total = 0.f;
  for (int w = 0; w < warps; ++w) total += scratch[first + w];
  return total;
}

}  // namespace dk
