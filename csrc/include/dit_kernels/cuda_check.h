// CUDA runtime errors as C++ exceptions (pybind11 turns std::runtime_error into RuntimeError). nvcc only.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace dk {

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("dit_kernels._C: ") + what + " failed: " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
  }
}

// Throws a clear RuntimeError instead of launching when no driver or device is usable.
void require_device();

}  // namespace dk
