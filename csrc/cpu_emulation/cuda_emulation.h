// CPU emulation of the small part of CUDA that dit_kernels' kernel bodies use (g++ only).
//
// What it is: a header that lets a CUDA kernel body (written against dit_kernels/portable.h) be compiled
// by g++ and run on the CPU with the same logic. dk::emu::launch starts one real std::thread per CUDA
// thread of a block, once per launch; every thread then walks all blocks in order (x fastest, then y,
// then z), so blocks run one after another and no thread starts block b+1 before all threads finished
// block b. It provides:
//   - dim3 and the thread_local threadIdx / blockIdx / blockDim / gridDim, read as in CUDA;
//   - __syncthreads(): a barrier over all threads of the block;
//   - __shfl_sync / __shfl_xor_sync / __shfl_up_sync / __shfl_down_sync / __syncwarp: through a per-warp
//     exchange buffer and a per-warp barrier (warps are 32 consecutive linear thread ids; a partial last
//     warp counts only its real threads). Each lane writes its value, waits at the warp barrier, reads its
//     partner; the buffer is double-buffered by barrier generation, which stands in for the second barrier;
//   - dynamic shared memory: one zeroed, 16-byte aligned buffer per launch (dk::emu::dynamic_smem());
//   - atomicAdd on float / double / int / unsigned / unsigned long long (std::atomic_ref);
//   - dk::emu::require_aligned: a vector access at a misaligned address fails the launch, as it faults
//     on the GPU (cudaErrorMisalignedAddress) instead of silently working as it would on the CPU.
// Static __shared__ arrays are plain function-local statics (DK_SHARED in portable.h): correct because
// only one launch runs at a time (a global mutex) and blocks run one after another.
//
// Failure handling: a barrier that can never complete (a divergent __syncthreads or shuffle: some threads
// returned early or wait at another barrier) is detected at once when every thread of the block is
// waiting; a wait longer than the timeout (dk::emu::set_barrier_timeout_ms or the environment variable
// DIT_KERNELS_EMU_BARRIER_TIMEOUT_MS, default 20 s; a slow or looping thread) fails too. In
// both cases, and when a kernel thread throws, every thread is woken and leaves its kernel, all are
// joined, and launch() throws std::runtime_error. Nothing deadlocks or calls std::terminate.
//
// Assumptions: every warp-level call (shuffle, __syncwarp) is made by all real lanes of the warp together
// (the mask argument is ignored); reading a lane that does not exist (past the end of a partial warp)
// throws, where CUDA would return an undefined value.
//
// What it cannot emulate: tensor cores (mma/wgmma), cp.async, TMA, mbarriers, clusters, other intrinsics
// (__ldg, fast-math functions, ...), GPU memory-model subtleties (all threads here see sequentially
// consistent memory at barriers), races between blocks (blocks never run concurrently here), launch
// bounds, register or shared-memory limits (other than the 1024-thread and 227 KB dynamic smem caps),
// and any real timing. Shared memory is zero at first here, then keeps the previous block's data.
// Races inside a block are real races between std::threads: build with -fsanitize=thread to find them.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emulation.h is the g++ CPU emulation; nvcc must use the real CUDA built-ins"
#endif

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Set by the emulator in each kernel thread; read-only for kernel code (as in CUDA).
inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{0, 0, 0};
inline thread_local dim3 gridDim{0, 0, 0};

namespace dk::emu {

constexpr unsigned kMaxBlockThreads = 1024;
constexpr std::size_t kMaxDynamicSmemBytes = 227 * 1024;  // sm_90 opt-in maximum

namespace detail {

// Default barrier timeout: 20 s, or DIT_KERNELS_EMU_BARRIER_TIMEOUT_MS from the environment.
inline unsigned initial_timeout_ms() {
  const char* env = std::getenv("DIT_KERNELS_EMU_BARRIER_TIMEOUT_MS");
  char* end = nullptr;
  const unsigned long ms = env ? std::strtoul(env, &end, 10) : 0;
  return env && end != env && *end == '\0' && ms > 0 && ms < 0xffffffffu ? unsigned(ms) : 20000u;
}
inline std::atomic<unsigned> g_timeout_ms{initial_timeout_ms()};
inline std::mutex g_launch_mutex;  // one launch at a time

struct Abort {};  // internal: unwinds a kernel thread once the launch has failed (not a std::exception)

// A misuse detected by the emulator inside a kernel thread (reported with its block and thread).
struct EmulationError : std::runtime_error {
  explicit EmulationError(const std::string& what) : std::runtime_error("dit_kernels CPU emulation: " + what) {}
};

enum Kind { kSync = 0, kWarp = 1, kBlockEnd = 2 };

struct Barrier {
  std::condition_variable cv;
  unsigned expected = 0;
  unsigned arrived = 0;
  std::uint64_t generation = 0;
  Kind kind = kSync;
};

struct Warp {
  Barrier barrier;
  std::uint64_t slot[2][32] = {};  // double-buffered by barrier generation parity
};

struct Launch {
  dim3 grid, block;
  unsigned nthreads = 0;
  std::chrono::milliseconds timeout{0};
  std::vector<std::uint64_t> smem_storage;  // 8-byte words; the pointer is then aligned to 16 below
  unsigned char* smem = nullptr;
  std::mutex m;  // guards everything below
  Barrier sync, block_end;
  std::unique_ptr<Warp[]> warps;
  unsigned nwarps = 0;
  unsigned blocked = 0;  // threads waiting at a barrier that has not completed
  unsigned blocked_at[3] = {0, 0, 0};
  bool failed = false;
  std::string error;
};

inline thread_local Launch* t_launch = nullptr;
inline thread_local unsigned t_linear_tid = 0;

inline std::string str(dim3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

inline std::string block_name(const Launch& L) {
  const dim3 b = blockIdx;
  const unsigned long long linear = b.x + (unsigned long long)L.grid.x * (b.y + (unsigned long long)L.grid.y * b.z);
  return "block " + std::to_string(linear) + (L.grid.y > 1 || L.grid.z > 1 ? " " + str(b) : std::string());
}

inline std::string waiting_summary(const Launch& L) {
  return std::to_string(L.blocked_at[kSync]) + " of " + std::to_string(L.nthreads) +
         " threads wait at __syncthreads, " + std::to_string(L.blocked_at[kWarp]) +
         " at a warp shuffle/__syncwarp, " + std::to_string(L.blocked_at[kBlockEnd]) +
         " have finished the block (returned early?)";
}

// Caller holds L.m. Records the first error and wakes every waiting thread.
inline void fail_locked(Launch& L, std::string message) {
  if (!L.failed) {
    L.failed = true;
    L.error = std::move(message);
  }
  L.sync.cv.notify_all();
  L.block_end.cv.notify_all();
  for (unsigned w = 0; w < L.nwarps; ++w) L.warps[w].barrier.cv.notify_all();
}

// Caller holds lk on L.m. Returns when all expected threads arrived; throws Abort if the launch failed.
inline void arrive_and_wait(Launch& L, Barrier& b, std::unique_lock<std::mutex>& lk) {
  if (L.failed) throw Abort{};
  const std::uint64_t gen = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    L.blocked -= b.expected - 1;
    L.blocked_at[b.kind] -= b.expected - 1;
    b.cv.notify_all();
    return;
  }
  ++L.blocked;
  ++L.blocked_at[b.kind];
  if (L.blocked == L.nthreads) {  // nobody is left to arrive anywhere: a divergent barrier
    fail_locked(L, "dit_kernels CPU emulation: __syncthreads deadlock (divergent barrier?) in " + block_name(L) +
                       ": " + waiting_summary(L) + "; none of these barriers can complete");
    throw Abort{};
  }
  const auto deadline = std::chrono::steady_clock::now() + L.timeout;
  while (b.generation == gen && !L.failed) {
    if (b.cv.wait_until(lk, deadline) == std::cv_status::timeout && b.generation == gen && !L.failed) {
      fail_locked(L, "dit_kernels CPU emulation: __syncthreads timed out (divergent barrier?) in " + block_name(L) +
                         " after " + std::to_string(L.timeout.count()) + " ms: " + waiting_summary(L) +
                         " (a slow thread? see dk::emu::set_barrier_timeout_ms)");
    }
  }
  if (b.generation == gen) throw Abort{};
}

inline Launch& current(const char* what) {
  if (!t_launch)
    throw std::logic_error(std::string("dit_kernels CPU emulation: ") + what + " called outside dk::emu::launch");
  return *t_launch;
}

// Every lane of the calling warp stores v, then each reads the value of lane src (within its warp).
template <class T>
T warp_exchange(T v, unsigned src, const char* what) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move trivially copyable values of <= 8 bytes");
  Launch& L = current(what);
  const unsigned warp = t_linear_tid / 32, lane = t_linear_tid % 32;
  Warp& W = L.warps[warp];
  if (src >= W.barrier.expected)
    throw EmulationError(std::string(what) + " in lane " + std::to_string(lane) + " reads lane " +
                         std::to_string(src) + ", which does not exist: warp " + std::to_string(warp) + " has only " +
                         std::to_string(W.barrier.expected) + " threads (block size not a multiple of 32)");
  std::unique_lock<std::mutex> lk(L.m);
  if (L.failed) throw Abort{};
  const unsigned buf = unsigned(W.barrier.generation & 1);
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  W.slot[buf][lane] = bits;
  arrive_and_wait(L, W.barrier, lk);
  // slot[buf] is rewritten only at generation + 2, which needs this thread to arrive again first.
  bits = W.slot[buf][src];
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

inline unsigned check_width(int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    throw EmulationError("shuffle width must be a power of two <= 32, got " + std::to_string(width));
  return unsigned(width);
}

inline unsigned lane_id() { return t_linear_tid % 32; }

// Type-erased callable so that the launch machinery below is not a template.
struct Body {
  void (*call)(const void*);
  const void* object;
};

inline void thread_main(Launch& L, unsigned tid, Body body) {
  t_launch = &L;
  t_linear_tid = tid;
  threadIdx = dim3(tid % L.block.x, (tid / L.block.x) % L.block.y, tid / (L.block.x * L.block.y));
  blockDim = L.block;
  gridDim = L.grid;
  try {
    for (unsigned z = 0; z < L.grid.z; ++z)
      for (unsigned y = 0; y < L.grid.y; ++y)
        for (unsigned x = 0; x < L.grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          body.call(body.object);
          std::unique_lock<std::mutex> lk(L.m);
          arrive_and_wait(L, L.block_end, lk);
        }
  } catch (const Abort&) {
  } catch (const EmulationError& e) {
    std::lock_guard<std::mutex> lk(L.m);
    fail_locked(L, std::string(e.what()) + " (" + block_name(L) + ", thread " + std::to_string(tid) + ")");
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lk(L.m);
    fail_locked(L, "dit_kernels CPU emulation: kernel threw in " + block_name(L) + ", thread " + std::to_string(tid) +
                       ": " + e.what());
  } catch (...) {
    std::lock_guard<std::mutex> lk(L.m);
    fail_locked(L, "dit_kernels CPU emulation: kernel threw a non-std exception in " + block_name(L) + ", thread " +
                       std::to_string(tid));
  }
  t_launch = nullptr;
}

inline void run(dim3 grid, dim3 block, std::size_t smem_bytes, Body body) {
  const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
  const bool block_ok =
      nthreads > 0 && nthreads <= kMaxBlockThreads && block.x <= 1024 && block.y <= 1024 && block.z <= 64;
  const bool grid_ok =
      grid.x > 0 && grid.y > 0 && grid.z > 0 && grid.x <= 0x7fffffffu && grid.y <= 65535 && grid.z <= 65535;
  if (!block_ok || !grid_ok || smem_bytes > kMaxDynamicSmemBytes)
    throw std::runtime_error("dit_kernels CPU emulation: invalid launch configuration: grid " + str(grid) + ", block " +
                             str(block) + ", " + std::to_string(smem_bytes) + " bytes of dynamic shared memory");
  if (t_launch) throw std::logic_error("dit_kernels CPU emulation: launch from inside a kernel is not supported");

  std::lock_guard<std::mutex> one_at_a_time(g_launch_mutex);
  Launch L;
  L.grid = grid;
  L.block = block;
  L.nthreads = unsigned(nthreads);
  L.timeout = std::chrono::milliseconds(g_timeout_ms.load());
  L.smem_storage.assign(smem_bytes / 8 + 3, 0);  // zeroed; +2 words of slack for the alignment below
  const std::uintptr_t storage = reinterpret_cast<std::uintptr_t>(L.smem_storage.data());
  L.smem = reinterpret_cast<unsigned char*>((storage + 15) & ~std::uintptr_t(15));
  L.sync.expected = L.block_end.expected = L.nthreads;
  L.sync.kind = kSync;
  L.block_end.kind = kBlockEnd;
  L.nwarps = (L.nthreads + 31) / 32;
  L.warps.reset(new Warp[L.nwarps]);
  for (unsigned w = 0; w < L.nwarps; ++w) {
    L.warps[w].barrier.expected = w + 1 < L.nwarps ? 32 : L.nthreads - 32 * w;
    L.warps[w].barrier.kind = kWarp;
  }

  std::vector<std::thread> threads;
  threads.reserve(L.nthreads);
  try {
    for (unsigned t = 0; t < L.nthreads; ++t) threads.emplace_back(thread_main, std::ref(L), t, body);
  } catch (const std::exception& e) {
    std::lock_guard<std::mutex> lk(L.m);
    fail_locked(L, "dit_kernels CPU emulation: could not start thread " + std::to_string(threads.size()) + " of " +
                       std::to_string(L.nthreads) + ": " + e.what());
  }
  for (auto& t : threads) t.join();
  if (L.failed) throw std::runtime_error(L.error);
}

}  // namespace detail

// Timeout of one barrier wait (all kinds), for launches started after the call. Default 20000 ms, or the
// environment variable DIT_KERNELS_EMU_BARRIER_TIMEOUT_MS.
inline void set_barrier_timeout_ms(unsigned ms) { detail::g_timeout_ms.store(ms); }
inline unsigned barrier_timeout_ms() { return detail::g_timeout_ms.load(); }

// Inside a kernel: throws (failing the launch with the block and thread) unless p is a multiple of
// `bytes`, as a GPU vector access of that size would fault. Portable code reaches it through dk::load16.
inline void require_aligned(const void* p, std::size_t bytes, const char* what) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  if (address % bytes == 0) return;
  char hex[32];
  std::snprintf(hex, sizeof hex, "0x%llx", static_cast<unsigned long long>(address));
  throw detail::EmulationError("misaligned address: " + std::string(what) + " at " + hex + " needs " +
                               std::to_string(bytes) + "-byte alignment (cudaErrorMisalignedAddress on a GPU)");
}

// The current launch's dynamic shared memory (16-byte aligned, dynamic_smem_bytes long).
inline void* dynamic_smem() { return detail::current("dynamic shared memory").smem; }

// Runs k(args...) for every thread of every block, as kernel<<<grid, block, dynamic_smem_bytes>>>(args...)
// would; returns when all are done. Throws std::runtime_error on a divergent/timed-out barrier, an
// exception thrown by the kernel, or an invalid configuration.
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, std::size_t dynamic_smem_bytes, Kernel k, Args... args) {
  auto call = [&] { k(args...); };  // each thread passes its own copies of args, as kernel parameters
  using Call = decltype(call);
  detail::run(grid, block, dynamic_smem_bytes,
              detail::Body{[](const void* p) { (*static_cast<const Call*>(p))(); }, &call});
}

}  // namespace dk::emu

// ---- CUDA built-ins, same spelling as in device code -------------------------------------------------

inline void __syncthreads() {
  dk::emu::detail::Launch& L = dk::emu::detail::current("__syncthreads");
  std::unique_lock<std::mutex> lk(L.m);
  dk::emu::detail::arrive_and_wait(L, L.sync, lk);
}

inline void __syncwarp(unsigned /*mask*/ = 0xffffffffu) {
  dk::emu::detail::warp_exchange<int>(0, dk::emu::detail::lane_id(), "__syncwarp");
}

template <class T>
T __shfl_sync(unsigned /*mask*/, T v, int src_lane, int width = 32) {
  const unsigned w = dk::emu::detail::check_width(width), lane = dk::emu::detail::lane_id();
  return dk::emu::detail::warp_exchange(v, (lane & ~(w - 1)) + (unsigned(src_lane) & (w - 1)), "__shfl_sync");
}

template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int lane_mask, int width = 32) {
  const unsigned w = dk::emu::detail::check_width(width), lane = dk::emu::detail::lane_id();
  unsigned src = lane ^ unsigned(lane_mask);
  if (src >= (lane & ~(w - 1)) + w) src = lane;  // later segments cannot be read: own value
  return dk::emu::detail::warp_exchange(v, src, "__shfl_xor_sync");
}

template <class T>
T __shfl_up_sync(unsigned /*mask*/, T v, unsigned delta, int width = 32) {
  const unsigned w = dk::emu::detail::check_width(width), lane = dk::emu::detail::lane_id();
  const unsigned first = lane & ~(w - 1);
  return dk::emu::detail::warp_exchange(v, lane >= first + delta ? lane - delta : lane, "__shfl_up_sync");
}

template <class T>
T __shfl_down_sync(unsigned /*mask*/, T v, unsigned delta, int width = 32) {
  const unsigned w = dk::emu::detail::check_width(width), lane = dk::emu::detail::lane_id();
  const unsigned end = (lane & ~(w - 1)) + w;
  return dk::emu::detail::warp_exchange(v, lane + delta < end ? lane + delta : lane, "__shfl_down_sync");
}

template <class T>
  requires(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, int> ||
           std::is_same_v<T, unsigned> || std::is_same_v<T, unsigned long long>)
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
