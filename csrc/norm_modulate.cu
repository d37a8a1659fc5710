// nvcc launcher of the norm/modulate kernel (dit_kernels._C).
#include <cuda_runtime.h>

#include "dit_kernels/cuda_check.h"
#include "dit_kernels/dtype_dispatch.cuh"
#include "dit_kernels/launch.h"
#include "dit_kernels/norm_modulate.cuh"

namespace dk {

void launch_norm_modulate(DType dtype, const NormModulateParams& p, std::uintptr_t stream) {
  require_device();
  const LaunchShape shape = norm_modulate_shape(p, int64_t(1) << 30);
  if (shape.grid == 0) return;
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = shape.team == 32 ? norm_modulate_kernel<T, 32> : norm_modulate_kernel<T, kNormModulateBlock>;
    kernel<<<dim3(unsigned(shape.grid)), dim3(kNormModulateBlock), shape.dynamic_smem,
             reinterpret_cast<cudaStream_t>(stream)>>>(p);
  });
  check_cuda(cudaGetLastError(), "norm_modulate launch");
}

}  // namespace dk
