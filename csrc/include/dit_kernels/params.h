// Plain parameter structs shared by kernels, launchers and python/bindings.cpp (no CUDA headers).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dk {

enum class DType { f32, f16, bf16 };

inline DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::f32;
  if (name == "float16") return DType::f16;
  if (name == "bfloat16") return DType::bf16;
  throw std::invalid_argument("dit_kernels: unsupported dtype '" + name + "' (float32, float16, bfloat16)");
}

// One [B, S, D] operand: pointer (nullptr = absent) and its batch / sequence strides in elements.
struct RowOperand {
  const void* ptr;
  int64_t stride_b;
  int64_t stride_s;
};

constexpr int64_t kNormModulateMaxDim = 12288;  // normalize: a row in registers (checked by the binding)

struct NormModulateParams {
  void* out;            // [B, S, D] dense, written when normalize
  void* h_out;          // [B, S, D] dense, written when y is given
  RowOperand x, y, gate, shift, scale;
  const void* weight;   // [D] or nullptr
  const void* bias;     // [D] or nullptr
  int64_t rows;         // B * S
  int64_t seq_len;      // S
  int64_t dim;          // D
  float eps;
  bool normalize;
};

// One tensor of a qk_norm_rope launch: source [B, S, H, Dh] -> dest (same shape; already the view at the
// joint-buffer rows). Strides in elements, unit last stride on both. src == nullptr: the slot is absent.
struct QkNormRopeSlot {
  const void* src;
  int64_t src_sb, src_ss, src_sh;
  int64_t seq_len;      // S of this slot (q and k may differ)
  void* dst;
  int64_t dst_sb, dst_ss, dst_sh;
  const void* weight;   // [Dh] in T or nullptr (read only when normalize)
  const void* bias;     // [Dh] in T or nullptr (read only when normalize)
  bool normalize;       // apply the launch's norm to this slot
  bool rotate;          // apply RoPE to this slot
};

constexpr int kQkNormRopeMaxSlots = 3;  // q, k, v
constexpr int64_t kQkNormRopeMaxHeadDim = 512;  // checked by the binding (and first by the Python side)

struct QkNormRopeParams {
  QkNormRopeSlot slot[kQkNormRopeMaxSlots];  // blockIdx.y picks one
  int n_slots;          // 2 (q, k) or 3 (q, k, v)
  int64_t batch;
  int64_t heads;
  int64_t head_dim;     // Dh, even when any slot rotates
  int norm;             // 0 none, 1 rms, 2 layer
  float eps;
  const float* cos;     // [S_table, Dh] fp32, row rope_offset + s; nullptr when nothing rotates
  const float* sin;
  int64_t rope_offset;
  int64_t rope_stride;  // elements between cos/sin rows: Dh, or 0 for one row broadcast over the sequence
  bool rope_half;       // false: interleaved pairs (x0, x1) -> (-x1, x0); true: halves (a, b) -> (-b, a)
  bool across_heads;    // normalise each token's H * Dh values together, weight / bias [H * Dh]
                        // (qk_norm_rope_across.cuh); else each head's Dh values (qk_norm_rope.cuh)
};

}  // namespace dk
