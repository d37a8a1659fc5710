// Portability layer for kernel bodies compiled twice: by nvcc (real CUDA kernels) and by g++ -std=c++20
// (the CPU emulation in csrc/cpu_emulation/cuda_emulation.h: one std::thread per CUDA thread, blocks
// one after another). A kernel body written against this header compiles and behaves the same on both.
//
// Kernel code may use, with the same spelling under both compilers:
//   DK_GLOBAL void kernel(...)        __global__ / a plain function (launched by dk::emu::launch)
//   DK_LAUNCH_BOUNDS(n)               __launch_bounds__(n) / nothing (between DK_GLOBAL void and the name)
//   DK_DEVICE T helper(...)           __device__ __forceinline__ / inline
//   DK_SHARED float buf[N];           __shared__ / static (one launch at a time, blocks in sequence)
//   DK_DYNAMIC_SMEM(float, name);     float* name = the launch's dynamic shared memory (16-byte aligned)
//   DK_UNROLL                         #pragma unroll / nothing
//   threadIdx, blockIdx, blockDim, gridDim (.x/.y/.z, unsigned), __syncthreads(), __syncwarp(),
//   __shfl_sync / __shfl_xor_sync / __shfl_up_sync / __shfl_down_sync (full warp), atomicAdd
//   dk::bf16, dk::half, dk::to_float, dk::from_float<T>, dk::to_bits, dk::from_bits<T>,
//   dk::warp_sum, dk::warp_max, dk::rsqrt, dk::kWarpSize
//   dk::Pack16<T>, dk::load16 (read-only data), dk::store16: 16 bytes of T as one 128-bit access
//     (16-byte aligned; a misaligned address faults on the GPU and fails the launch in the emulation)
//
// Semantics that differ by design: dk::rsqrt is rsqrtf (approximate, <= 2 ulp) on CUDA and a correctly
// rounded 1 / sqrt on the CPU; NaN bit patterns from from_float differ (CPU: torch's CPU tensor results,
// bf16 0xFFFF and half sign|0x7E00|payload; CUDA: 0x7FFF canonical NaNs). All other conversions are
// bit-identical (round to nearest even, subnormals kept, overflow to infinity).
// dk::bf16 / dk::half have no arithmetic or implicit conversions on the CPU: use to_float / from_float.
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define DK_DEVICE __device__ __forceinline__
#define DK_GLOBAL __global__
#define DK_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define DK_SHARED __shared__
// One extern array of one type for every kernel, so several instantiations can each take their own view.
#define DK_DYNAMIC_SMEM(type, name)                             \
  extern __shared__ __align__(16) unsigned char dk_smem_raw[]; \
  type* name = reinterpret_cast<type*>(dk_smem_raw)
#define DK_UNROLL _Pragma("unroll")

namespace dk {
using bf16 = __nv_bfloat16;
using half = __half;
}  // namespace dk

#else  // g++: the CPU emulation

#include <cmath>
#include <cstring>

#include "../../cpu_emulation/cuda_emulation.h"

#define DK_DEVICE inline
#define DK_GLOBAL
#define DK_LAUNCH_BOUNDS(n)
#define DK_SHARED static
#define DK_DYNAMIC_SMEM(type, name) type* name = static_cast<type*>(::dk::emu::dynamic_smem())
#define DK_UNROLL

namespace dk {

// Bit patterns of IEEE binary16 and bfloat16 (trivially copyable, 2 bytes, like the CUDA types).
struct bf16 {
  std::uint16_t bits;
};
struct half {
  std::uint16_t bits;
};
static_assert(sizeof(bf16) == 2 && sizeof(half) == 2 && std::is_trivially_copyable_v<bf16> &&
              std::is_trivially_copyable_v<half> && std::is_trivial_v<bf16> && std::is_trivial_v<half>);

namespace detail {

inline std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_bits_to_float(std::uint16_t b) { return bits_float(std::uint32_t(b) << 16); }

// Round to nearest even on the upper 16 bits; overflow carries into the exponent and gives infinity.
// NaN -> 0xFFFF, as torch's vectorised CPU `.to(torch.bfloat16)` (0-dim tensors give 0x7FC0 there).
inline std::uint16_t float_to_bf16_bits(float f) {
  const std::uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffu;
  return std::uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant ? 0x400000u | (mant << 13) : 0u));  // inf; NaN quieted
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    exp = 113;  // subnormal: mant * 2^-24; normalise so the leading one is the implicit bit
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    return bits_float(sign | (exp << 23) | ((mant & 0x3ffu) << 13));
  }
  return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

// Round to nearest even, with subnormal results and overflow to infinity (|f| >= 65520).
// NaN -> sign | 0x7E00 | top payload bits, as torch's CPU `.to(torch.float16)` (F16C).
inline std::uint16_t float_to_half_bits(float f) {
  const std::uint32_t u = float_bits(f);
  const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  const std::uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return std::uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // 65520 = halfway above 65504 rounds up
  if (a >= 0x38800000u) {  // normal half: rebias the exponent by 127 - 15, drop 13 mantissa bits
    const std::uint32_t r = a - (112u << 23);
    return std::uint16_t(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
  }
  if (a <= 0x33000000u) return sign;  // <= 2^-25 (half the smallest subnormal; the tie goes to 0)
  const std::uint32_t shift = 126 - (a >> 23);  // result = mantissa_with_one >> shift, in units of 2^-24
  const std::uint32_t m = (a & 0x7fffffu) | 0x800000u;
  std::uint32_t k = m >> shift;
  const std::uint32_t rest = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
  if (rest > halfway || (rest == halfway && (k & 1u))) ++k;  // may carry into the smallest normal: correct
  return std::uint16_t(sign | k);
}

}  // namespace detail
}  // namespace dk

#endif

namespace dk {

constexpr int kWarpSize = 32;

namespace detail {
template <class>
inline constexpr bool dependent_false = false;
}

// float, bf16 or half -> float (exact).
template <class T>
DK_DEVICE float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, bf16>) {
#if defined(__CUDACC__)
    return __bfloat162float(v);
#else
    return detail::bf16_bits_to_float(v.bits);
#endif
  } else if constexpr (std::is_same_v<T, half>) {
#if defined(__CUDACC__)
    return __half2float(v);
#else
    return detail::half_bits_to_float(v.bits);
#endif
  } else {
    static_assert(detail::dependent_false<T>, "dk::to_float supports float, dk::bf16 and dk::half");
  }
}

// float -> float, bf16 or half, rounding to nearest even.
template <class T>
DK_DEVICE T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else if constexpr (std::is_same_v<T, bf16>) {
#if defined(__CUDACC__)
    return __float2bfloat16_rn(v);
#else
    return bf16{detail::float_to_bf16_bits(v)};
#endif
  } else if constexpr (std::is_same_v<T, half>) {
#if defined(__CUDACC__)
    return __float2half_rn(v);
#else
    return half{detail::float_to_half_bits(v)};
#endif
  } else {
    static_assert(detail::dependent_false<T>, "dk::from_float supports float, dk::bf16 and dk::half");
  }
}

// Raw 16-bit patterns of bf16 / half, and back.
DK_DEVICE std::uint16_t to_bits(bf16 v) {
#if defined(__CUDACC__)
  return __bfloat16_as_ushort(v);
#else
  return v.bits;
#endif
}
DK_DEVICE std::uint16_t to_bits(half v) {
#if defined(__CUDACC__)
  return __half_as_ushort(v);
#else
  return v.bits;
#endif
}
template <class T>
DK_DEVICE T from_bits(std::uint16_t b) {
  static_assert(std::is_same_v<T, bf16> || std::is_same_v<T, half>, "dk::from_bits supports dk::bf16 and dk::half");
#if defined(__CUDACC__)
  if constexpr (std::is_same_v<T, bf16>) {
    return __ushort_as_bfloat16(b);
  } else {
    return __ushort_as_half(b);
  }
#else
  return T{b};
#endif
}

// Sum / max over the 32 lanes of a full warp (xor butterfly: every lane gets the same, bit-identical
// result). All 32 lanes must call it together; in the emulation a partial warp makes the launch fail.
DK_DEVICE float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

DK_DEVICE float warp_max(float v) {
#if defined(__CUDACC__)
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
#else
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = std::fmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
#endif
  return v;
}

// 16 bytes of T (8 bf16 / half, 4 float), 16-byte aligned.
template <class T>
struct alignas(16) Pack16 {
  static constexpr int kSize = int(16 / sizeof(T));
  T v[kSize];
};

#if defined(__CUDACC__)
namespace detail {
// 32-bit word k of a pack and back, through the bit patterns (a whole-struct memcpy can be split into
// narrower stores by the compiler).
template <class T>
DK_DEVICE unsigned pack_word(const Pack16<T>& pack, int k) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(pack.v[k]);
  } else {
    return unsigned(to_bits(pack.v[2 * k])) | (unsigned(to_bits(pack.v[2 * k + 1])) << 16);
  }
}
template <class T>
DK_DEVICE void unpack_word(Pack16<T>& pack, int k, unsigned word) {
  if constexpr (sizeof(T) == 4) {
    pack.v[k] = __uint_as_float(word);
  } else {
    pack.v[2 * k] = from_bits<T>(static_cast<std::uint16_t>(word & 0xffffu));
    pack.v[2 * k + 1] = from_bits<T>(static_cast<std::uint16_t>(word >> 16));
  }
}
}  // namespace detail
#endif

// One 128-bit load of the 16 bytes at p through the read-only data path (LDG.E.128.CONSTANT on the
// GPU): p must be 16-byte aligned, and the kernel must not write that memory.
template <class T>
DK_DEVICE Pack16<T> load16(const T* p) {
  Pack16<T> out;
#if defined(__CUDACC__)
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  detail::unpack_word(out, 0, raw.x);
  detail::unpack_word(out, 1, raw.y);
  detail::unpack_word(out, 2, raw.z);
  detail::unpack_word(out, 3, raw.w);
#else
  emu::require_aligned(p, 16, "a 16-byte load");
  std::memcpy(&out, p, sizeof(out));
#endif
  return out;
}

// One 128-bit store of v at p (STG.E.128 on the GPU); p must be 16-byte aligned.
template <class T>
DK_DEVICE void store16(T* p, const Pack16<T>& v) {
#if defined(__CUDACC__)
  // Inline PTX: through a plain uint4 store, nvcc 13 sometimes splits one of several into 32-bit stores.
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(detail::pack_word(v, 0)),
               "r"(detail::pack_word(v, 1)), "r"(detail::pack_word(v, 2)), "r"(detail::pack_word(v, 3))
               : "memory");
#else
  emu::require_aligned(p, 16, "a 16-byte store");
  std::memcpy(p, &v, sizeof(v));
#endif
}

// 1 / sqrt(x): rsqrtf on CUDA (approximate), 1.f / std::sqrt(x) on the CPU.
DK_DEVICE float rsqrt(float x) {
#if defined(__CUDACC__)
  return rsqrtf(x);
#else
  return 1.f / std::sqrt(x);
#endif
}

}  // namespace dk
