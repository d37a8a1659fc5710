// Host-side entry points of the kernels, implemented twice: by nvcc launchers (csrc/*.cu, module _C)
// and by the CPU emulation (csrc/cpu_emulation/*.cpp, module _C_cpu). No CUDA or torch headers here, so
// python/bindings.cpp compiles with the plain host compiler for both modules.
#pragma once

#include <cstdint>

#include "dit_kernels/params.h"

namespace dk {

// Number of CUDA devices; throws std::runtime_error naming the CUDA error when there is no usable driver.
int device_count();

// Each launcher returns the bytes per global access its kernel used for the row data: 16 on the vector
// path (every pointer and stride 16-byte aligned, the row length a multiple of 16 bytes), else the
// element size (the scalar path). See csrc/include/dit_kernels/row_team.cuh.

// Runs norm_modulate_kernel for p on the given stream (a cudaStream_t as an integer; ignored on CPU).
int launch_norm_modulate(DType dtype, const NormModulateParams& p, std::uintptr_t stream);

// Runs qk_norm_rope_kernel for p (one launch for all p.n_slots slots) on the given stream.
int launch_qk_norm_rope(DType dtype, const QkNormRopeParams& p, std::uintptr_t stream);

}  // namespace dk
