// pybind11 bindings, compiled into two modules from this one file:
//   dit_kernels._C      (DK_EMULATED=0): launchers from csrc/*.cu, real CUDA kernels;
//   dit_kernels._C_cpu  (DK_EMULATED=1): launchers from csrc/cpu_emulation/, the same kernel source on CPU.
// Tensors cross as raw addresses (t.data_ptr()) plus strides, and streams as integers: no torch headers,
// so the module works with any torch build and imports on a machine without a CUDA driver.
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

void norm_modulate(const std::string& dtype, int64_t rows, int64_t seq_len, int64_t dim, std::uintptr_t out,
                   std::uintptr_t h_out, const Operand& x, const Operand& y, const Operand& gate,
                   const Operand& shift, const Operand& scale, std::uintptr_t weight, std::uintptr_t bias,
                   float eps, bool normalize, std::uintptr_t stream) {
  if (dim <= 0 || seq_len <= 0 || rows < 0 || rows % seq_len != 0) {
    throw std::invalid_argument("norm_modulate: need dim > 0, seq_len > 0 and rows a multiple of seq_len");
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
  dk::launch_norm_modulate(type, p, stream);
}

}  // namespace

PYBIND11_MODULE(DK_MODULE_NAME, m) {
  m.doc() = "dit_kernels CUDA C++ kernels (raw pointers + stream handle; see dit_kernels/ops for the API)";
  m.attr("EMULATED") = bool(DK_EMULATED);
  m.def("device_count", &dk::device_count, "CUDA devices; RuntimeError naming the CUDA error without a driver");
  m.def("norm_modulate", &norm_modulate, "LayerNorm + modulate / gated residual (csrc/include/dit_kernels/norm_modulate.cuh)",
        py::arg("dtype"), py::arg("rows"), py::arg("seq_len"), py::arg("dim"), py::arg("out"), py::arg("h_out"),
        py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("shift"), py::arg("scale"), py::arg("weight"),
        py::arg("bias"), py::arg("eps"), py::arg("normalize"), py::arg("stream"));
}
