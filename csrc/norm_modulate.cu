// nvcc launcher of the norm/modulate kernel (dit_kernels._C).
#include <cuda_runtime.h>

#include "dit_kernels/cuda_check.h"
#include "dit_kernels/dtype_dispatch.cuh"
#include "dit_kernels/launch.h"
#include "dit_kernels/norm_modulate.cuh"

namespace dk {

int launch_norm_modulate(DType dtype, const NormModulateParams& p, std::uintptr_t stream) {
  require_device();
  int access_bytes = 0;
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const NormModulateLaunch shape = norm_modulate_launch<T>(p, int64_t(1) << 30);
    access_bytes = shape.vector ? 16 : int(sizeof(T));
    if (shape.grid == 0) return;
    auto kernel = shape.vector ? norm_modulate_kernel<T, true> : norm_modulate_kernel<T, false>;
    kernel<<<dim3(unsigned(shape.grid)), dim3(unsigned(shape.block)), 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        p, shape.team_log2);
  });
  check_cuda(cudaGetLastError(), "norm_modulate launch");
  return access_bytes;
}

}  // namespace dk
