// nvcc launcher of the QK norm + RoPE kernel (dit_kernels._C).
#include <cuda_runtime.h>

#include "dit_kernels/cuda_check.h"
#include "dit_kernels/dtype_dispatch.cuh"
#include "dit_kernels/launch.h"
#include "dit_kernels/qk_norm_rope.cuh"

namespace dk {

void launch_qk_norm_rope(DType dtype, const QkNormRopeParams& p, std::uintptr_t stream) {
  require_device();
  const int64_t grid = qk_norm_rope_grid(p, int64_t(1) << 30);
  if (grid == 0) return;
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    qk_norm_rope_kernel<T><<<dim3(unsigned(grid), unsigned(p.n_slots)), dim3(kQkNormRopeBlock), 0,
                             reinterpret_cast<cudaStream_t>(stream)>>>(p);
  });
  check_cuda(cudaGetLastError(), "qk_norm_rope launch");
}

}  // namespace dk
