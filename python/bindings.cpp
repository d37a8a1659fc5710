// pybind11 bindings, compiled into two modules from this one file:
//   dit_kernels._C      (DK_EMULATED=0): launchers from csrc/*.cu, real CUDA kernels;
//   dit_kernels._C_cpu  (DK_EMULATED=1): launchers from csrc/cpu_emulation/, the same kernel source on CPU.
// Tensors cross as raw addresses (t.data_ptr()) plus strides, and streams as integers: no torch headers,
// so the module works with any torch build and imports on a machine without a CUDA driver. Each launch
// returns the bytes per global access its kernel used (16: the vector path; else the element size).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "dit_kernels/launch.h"

namespace py = pybind11;

namespace {

using Operand = std::tuple<std::uintptr_t, int64_t, int64_t>;  // (address or 0, stride_b, stride_s)

dk::RowOperand row_operand(const Operand& op) {
  return {reinterpret_cast<const void*>(std::get<0>(op)), std::get<1>(op), std::get<2>(op)};
}

int norm_modulate(const std::string& dtype, int64_t rows, int64_t seq_len, int64_t dim, std::uintptr_t out,
                   std::uintptr_t h_out, const Operand& x, const Operand& y, const Operand& gate,
                   const Operand& shift, const Operand& scale, std::uintptr_t weight, std::uintptr_t bias,
                   float eps, bool normalize, std::uintptr_t stream) {
  if (dim <= 0 || seq_len <= 0 || rows < 0 || rows % seq_len != 0) {
    throw std::invalid_argument("norm_modulate: need dim > 0, seq_len > 0 and rows a multiple of seq_len");
  }
  if (normalize && dim > dk::kNormModulateMaxDim) {
    throw std::invalid_argument("norm_modulate: normalize takes dim <= " + std::to_string(dk::kNormModulateMaxDim) +
                                ", got " + std::to_string(dim));
  }
  if (std::get<0>(x) == 0) throw std::invalid_argument("norm_modulate: x is required");
  if (normalize && out == 0) throw std::invalid_argument("norm_modulate: normalize needs an output");
  if (std::get<0>(y) != 0 && h_out == 0) throw std::invalid_argument("norm_modulate: y needs an h output");
  const dk::DType type = dk::parse_dtype(dtype);
  dk::NormModulateParams p{reinterpret_cast<void*>(out), reinterpret_cast<void*>(h_out), row_operand(x),
                           row_operand(y), row_operand(gate), row_operand(shift), row_operand(scale),
                           reinterpret_cast<const void*>(weight), reinterpret_cast<const void*>(bias),
                           rows, seq_len, dim, eps, normalize};
  py::gil_scoped_release release;
  return dk::launch_norm_modulate(type, p, stream);
}

// (src, src_sb, src_ss, src_sh, seq_len, dst, dst_sb, dst_ss, dst_sh, weight, bias, normalize, rotate);
// src 0 = the slot is absent. Strides in elements; weight / bias 0 = none.
using QkSlot = std::tuple<std::uintptr_t, int64_t, int64_t, int64_t, int64_t, std::uintptr_t, int64_t, int64_t, int64_t,
                          std::uintptr_t, std::uintptr_t, bool, bool>;

// A slot with no rows (S == 0 or B == 0) becomes an absent one: its tensors may have no storage (address 0).
dk::QkNormRopeSlot qk_slot(const QkSlot& t, const char* name, bool required, int64_t batch, int64_t head_dim,
                           bool has_tables) {
  const auto& [src, src_sb, src_ss, src_sh, seq_len, dst, dst_sb, dst_ss, dst_sh, weight, bias, normalize, rotate] = t;
  const std::string slot = std::string("qk_norm_rope: ") + name;
  if (seq_len < 0) throw std::invalid_argument(slot + ": seq_len must be >= 0");
  if (src == 0 && required && seq_len * batch != 0) throw std::invalid_argument(slot + " is required (address 0)");
  if (src == 0 || seq_len * batch == 0) return dk::QkNormRopeSlot{};
  if (dst == 0) throw std::invalid_argument(slot + " needs a destination");
  if (rotate && !has_tables) throw std::invalid_argument(slot + " rotates but cos/sin are missing");
  if (rotate && head_dim % 2 != 0) throw std::invalid_argument(slot + " rotates: head_dim must be even");
  return {reinterpret_cast<const void*>(src), src_sb, src_ss, src_sh, seq_len, reinterpret_cast<void*>(dst),
          dst_sb, dst_ss, dst_sh, reinterpret_cast<const void*>(weight), reinterpret_cast<const void*>(bias),
          normalize, rotate};
}

int qk_norm_rope(const std::string& dtype, int64_t batch, int64_t heads, int64_t head_dim, const QkSlot& q,
                  const QkSlot& k, const QkSlot& v, int norm, float eps, std::uintptr_t cos, std::uintptr_t sin,
                  int64_t rope_offset, int64_t rope_stride, bool rope_half, bool across_heads, std::uintptr_t stream) {
  if (batch < 0 || heads <= 0 || head_dim <= 0 || head_dim > dk::kQkNormRopeMaxHeadDim) {
    throw std::invalid_argument("qk_norm_rope: need batch >= 0, heads > 0 and 0 < head_dim <= " +
                                std::to_string(dk::kQkNormRopeMaxHeadDim) + ", got head_dim " +
                                std::to_string(head_dim));
  }
  if (norm < 0 || norm > 2) throw std::invalid_argument("qk_norm_rope: norm must be 0 (none), 1 (rms) or 2 (layer)");
  if ((cos == 0) != (sin == 0)) throw std::invalid_argument("qk_norm_rope: cos and sin go together");
  if (rope_offset < 0) throw std::invalid_argument("qk_norm_rope: rope_offset must be >= 0");
  if (rope_stride < 0) throw std::invalid_argument("qk_norm_rope: rope_stride must be >= 0 (0: one row, broadcast)");
  const dk::DType type = dk::parse_dtype(dtype);
  const bool has_tables = cos != 0;
  dk::QkNormRopeParams p{};
  p.slot[0] = qk_slot(q, "q", true, batch, head_dim, has_tables);
  p.slot[1] = qk_slot(k, "k", true, batch, head_dim, has_tables);
  p.slot[2] = qk_slot(v, "v", false, batch, head_dim, has_tables);
  p.n_slots = std::get<0>(v) != 0 ? 3 : 2;
  p.batch = batch;
  p.heads = heads;
  p.head_dim = head_dim;
  p.norm = norm;
  p.eps = eps;
  p.cos = reinterpret_cast<const float*>(cos);
  p.sin = reinterpret_cast<const float*>(sin);
  p.rope_offset = rope_offset;
  p.rope_stride = rope_stride;
  p.rope_half = rope_half;
  p.across_heads = across_heads;
  py::gil_scoped_release release;
  return dk::launch_qk_norm_rope(type, p, stream);
}

}  // namespace

PYBIND11_MODULE(DK_MODULE_NAME, m) {
  m.doc() = "dit_kernels CUDA C++ kernels (raw pointers + stream handle; see dit_kernels/ops for the API)";
  m.attr("EMULATED") = bool(DK_EMULATED);
  m.def("device_count", &dk::device_count, "CUDA devices; RuntimeError naming the CUDA error without a driver");
  m.def("norm_modulate", &norm_modulate,
        "LayerNorm + modulate / gated residual (csrc/include/dit_kernels/norm_modulate.cuh); returns the bytes "
        "per global access (16: vector path, else the element size)",
        py::arg("dtype"), py::arg("rows"), py::arg("seq_len"), py::arg("dim"), py::arg("out"), py::arg("h_out"),
        py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("shift"), py::arg("scale"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("normalize"), py::arg("stream"));
  m.def("qk_norm_rope", &qk_norm_rope,
        "Per-head QK norm + RoPE into (joint) buffers, V copied; one launch for q, k, v "
        "(csrc/include/dit_kernels/qk_norm_rope.cuh; across_heads: each token's H * Dh values normalised "
        "together, qk_norm_rope_across.cuh). Slots: (src, src_sb, src_ss, src_sh, seq_len, dst, dst_sb, "
        "dst_ss, dst_sh, weight, bias, normalize, rotate), src 0 = absent; returns the bytes per global access "
        "(16: vector path, else the element size)",
        py::arg("dtype"), py::arg("batch"), py::arg("heads"), py::arg("head_dim"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("norm"), py::arg("eps"), py::arg("cos"), py::arg("sin"), py::arg("rope_offset"),
        py::arg("rope_stride"), py::arg("rope_half"), py::arg("across_heads"), py::arg("stream"));
}
