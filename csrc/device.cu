// Device discovery for dit_kernels._C: turns "no driver" (cudaErrorInsufficientDriver, 35, on a
// machine without a GPU) into an exception instead of a crash at the first launch.
#include <atomic>

#include "dit_kernels/cuda_check.h"
#include "dit_kernels/launch.h"

namespace dk {

int device_count() {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount (is an NVIDIA driver installed?)");
  return count;
}

void require_device() {
  static std::atomic<bool> ready{false};
  if (ready.load(std::memory_order_relaxed)) return;
  if (device_count() == 0) throw std::runtime_error("dit_kernels._C: no CUDA device");
  ready.store(true, std::memory_order_relaxed);
}

}  // namespace dk
