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

}  // namespace dk
