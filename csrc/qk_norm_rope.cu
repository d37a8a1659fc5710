// nvcc launcher of the QK norm + RoPE kernel (dit_kernels._C).
#include <cuda_runtime.h>

#include "dit_kernels/cuda_check.h"
#include "dit_kernels/dtype_dispatch.cuh"
#include "dit_kernels/launch.h"
#include "dit_kernels/qk_norm_rope.cuh"
#include "dit_kernels/qk_norm_rope_across.cuh"

namespace dk {

int launch_qk_norm_rope(DType dtype, const QkNormRopeParams& p, std::uintptr_t stream) {
  require_device();
  int access_bytes = 0;
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.across_heads) {
      access_bytes = int(sizeof(T));
      const int64_t grid = qk_norm_rope_across_grid(p, int64_t(1) << 30);
      if (grid == 0) return;
      qk_norm_rope_across_kernel<T><<<dim3(unsigned(grid), unsigned(p.n_slots)), dim3(kQkNormRopeAcrossBlock), 0,
                                      reinterpret_cast<cudaStream_t>(stream)>>>(p);
      return;
    }
    const QkNormRopeLaunch shape = qk_norm_rope_launch<T>(p, int64_t(1) << 30);
    access_bytes = shape.vector ? 16 : int(sizeof(T));
    if (shape.grid == 0) return;
    auto kernel = shape.vector ? qk_norm_rope_kernel<T, true> : qk_norm_rope_kernel<T, false>;
    kernel<<<dim3(unsigned(shape.grid), unsigned(p.n_slots)), dim3(kQkNormRopeBlock), shape.dynamic_smem,
             reinterpret_cast<cudaStream_t>(stream)>>>(p, shape.team_log2);
  });
  check_cuda(cudaGetLastError(), "qk_norm_rope launch");
  return access_bytes;
}

}  // namespace dk
