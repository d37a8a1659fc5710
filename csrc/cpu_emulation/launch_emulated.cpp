// The CPU-emulation twins of the nvcc launchers (dit_kernels._C_cpu): same kernel bodies and launch
// shapes, run by dk::emu::launch with one std::thread per CUDA thread. A small grid on purpose: blocks
// are emulated one after another, and the kernels' grid-stride loops cover the remaining rows.
#include "dit_kernels/dtype_dispatch.cuh"
#include "dit_kernels/launch.h"
#include "dit_kernels/norm_modulate.cuh"
#include "dit_kernels/qk_norm_rope.cuh"
#include "dit_kernels/qk_norm_rope_across.cuh"

namespace dk {

constexpr int64_t kEmulatedMaxGrid = 3;

int device_count() { return 0; }

int launch_norm_modulate(DType dtype, const NormModulateParams& p, std::uintptr_t) {
  int access_bytes = 0;
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const NormModulateLaunch shape = norm_modulate_launch<T>(p, kEmulatedMaxGrid);
    access_bytes = shape.vector ? 16 : int(sizeof(T));
    if (shape.grid == 0) return;
    auto kernel = shape.vector ? norm_modulate_kernel<T, true> : norm_modulate_kernel<T, false>;
    emu::launch(dim3(unsigned(shape.grid)), dim3(unsigned(shape.block)), 0, kernel, p, shape.team_log2);
  });
  return access_bytes;
}

int launch_qk_norm_rope(DType dtype, const QkNormRopeParams& p, std::uintptr_t) {
  int access_bytes = 0;
  with_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (p.across_heads) {
      access_bytes = int(sizeof(T));
      const int64_t grid = qk_norm_rope_across_grid(p, kEmulatedMaxGrid);
      if (grid == 0) return;
      emu::launch(dim3(unsigned(grid), unsigned(p.n_slots)), dim3(kQkNormRopeAcrossBlock), 0,
                  qk_norm_rope_across_kernel<T>, p);
      return;
    }
    const QkNormRopeLaunch shape = qk_norm_rope_launch<T>(p, kEmulatedMaxGrid);  // kEmulatedMaxGrid x n_slots
    access_bytes = shape.vector ? 16 : int(sizeof(T));
    if (shape.grid == 0) return;
    auto kernel = shape.vector ? qk_norm_rope_kernel<T, true> : qk_norm_rope_kernel<T, false>;
    emu::launch(dim3(unsigned(shape.grid), unsigned(p.n_slots)), dim3(kQkNormRopeBlock), shape.dynamic_smem, kernel,
                p, shape.team_log2);
  });
  return access_bytes;
}

}  // namespace dk
