// The CPU-emulation twins of the nvcc launchers (dit_kernels._C_cpu): same kernel bodies, run by
// dk::emu::launch with one std::thread per CUDA thread. A small grid on purpose: blocks are emulated
// one after another, and the kernels' grid-stride loops cover the remaining rows.
#include "dit_kernels/dtype_dispatch.cuh"
#include "dit_kernels/launch.h"
#include "dit_kernels/norm_modulate.cuh"
#include "dit_kernels/qk_norm_rope.cuh"

namespace dk {

constexpr int64_t kEmulatedMaxGrid = 3;

int device_count() { return 0; }

void launch_norm_modulate(DType dtype, const NormModulateParams& p, std::uintptr_t) {
  const LaunchShape shape = norm_modulate_shape(p, kEmulatedMaxGrid);
  if (shape.grid == 0) return;
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = shape.team == 32 ? norm_modulate_kernel<T, 32> : norm_modulate_kernel<T, kNormModulateBlock>;
    emu::launch(dim3(unsigned(shape.grid)), dim3(kNormModulateBlock), shape.dynamic_smem, kernel, p);
  });
}

void launch_qk_norm_rope(DType dtype, const QkNormRopeParams& p, std::uintptr_t) {
  const int64_t grid = qk_norm_rope_grid(p, kEmulatedMaxGrid);  // kEmulatedMaxGrid x n_slots blocks
  if (grid == 0) return;
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    emu::launch(dim3(unsigned(grid), unsigned(p.n_slots)), dim3(kQkNormRopeBlock), 0, qk_norm_rope_kernel<T>, p);
  });
}

}  // namespace dk
