// Self-test of the CPU emulation (cuda_emulation.h) and of portable.h under g++.
//   g++ -std=c++20 -O1 -pthread -I csrc/include csrc/cpu_emulation/selftest.cpp -o selftest && ./selftest
// Prints "selftest: N passed, M failed"; exits nonzero when M > 0.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "dit_kernels/portable.h"

namespace {

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::printf("FAILED: %s\n", what.c_str());
  }
}

// Runs f, which must throw a std::exception whose message contains `needle` within max_seconds.
void check_throws(const std::function<void()>& f, const std::string& needle, const std::string& what,
                  double max_seconds = 60.0) {
  const auto t0 = std::chrono::steady_clock::now();
  std::string message = "(no exception)";
  bool threw = false;
  try {
    f();
  } catch (const std::exception& e) {
    threw = true;
    message = e.what();
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  check(threw && message.find(needle) != std::string::npos && seconds <= max_seconds,
        what + ": got [" + message + "] after " + std::to_string(seconds) + " s");
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%04x", v);
  return buf;
}

float f_of(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// ---- kernels ----------------------------------------------------------------------------------------

constexpr int kBlock = 256;

// (a) per-block sum and max of x[block * 256 + t]; also records the launch geometry.
template <int BLOCK>
DK_GLOBAL void block_reduce_kernel(const float* x, float* sums, float* maxes, unsigned* geometry) {
  DK_SHARED float partial_sum[BLOCK / 32];
  DK_SHARED float partial_max[BLOCK / 32];
  const unsigned t = threadIdx.x;
  const float v = x[blockIdx.x * blockDim.x + t];
  const float s = dk::warp_sum(v), m = dk::warp_max(v);
  if (t % 32 == 0) {
    partial_sum[t / 32] = s;
    partial_max[t / 32] = m;
  }
  __syncthreads();
  if (t == 0) {
    float total = 0.f, best = -INFINITY;
    for (int w = 0; w < BLOCK / 32; ++w) {
      total += partial_sum[w];
      best = std::fmax(best, partial_max[w]);
    }
    sums[blockIdx.x] = total;
    maxes[blockIdx.x] = best;
    geometry[blockIdx.x * 2] = gridDim.x;
    geometry[blockIdx.x * 2 + 1] = blockDim.x;
  }
  __syncthreads();  // partial_* are rewritten by the next block's threads
}

// (a) 3-D indices: every thread writes its linear id in its block, per block.
DK_GLOBAL void index_kernel(unsigned* out) {
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
  out[bid * nthreads + tid] = bid * 100000 + tid;
}

// (b) dynamic shared memory: rotate by one within the block through smem (several instantiations).
template <class T>
DK_GLOBAL void rotate_kernel(const T* in, T* out, unsigned* zero_and_aligned) {
  DK_DYNAMIC_SMEM(T, buf);  // 2 * blockDim.x elements
  const unsigned t = threadIdx.x, n = blockDim.x, base = blockIdx.x * n;
  if (blockIdx.x == 0) {  // fresh buffer: zeroed; 16-byte aligned
    const bool ok = buf[n + t] == T(0) && reinterpret_cast<std::uintptr_t>(buf) % 16 == 0;
    zero_and_aligned[t] = ok ? 1u : 0u;
  }
  buf[t] = in[base + t];
  __syncthreads();
  out[base + t] = buf[(t + 1) % n];
  __syncthreads();
}

// (c) partial warp: blockDim 48 (warp 0 full, warp 1 has 16 lanes). Xor shuffles within 16 lanes,
// shfl_sync broadcast from lane 3, shfl_down within width 16, __syncwarp and a block barrier.
DK_GLOBAL void partial_warp_kernel(int* out) {
  DK_SHARED int total;
  const int t = int(threadIdx.x);
  int v = t;
  for (int offset = 8; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);  // sum of 16-lane group
  const int from3 = __shfl_sync(0xffffffffu, t * 10, 3);
  const int down = __shfl_down_sync(0xffffffffu, t, 4, 16);
  __syncwarp();
  if (t == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, 1);
  __syncthreads();
  out[t * 4 + 0] = v;
  out[t * 4 + 1] = from3;
  out[t * 4 + 2] = down;
  out[t * 4 + 3] = total;
}

// (c) a full-width warp_sum on a partial warp reads lanes that do not exist.
DK_GLOBAL void partial_warp_sum_kernel(float* out) { out[threadIdx.x] = dk::warp_sum(1.f); }

// (e) divergent barrier: half the threads return before __syncthreads.
DK_GLOBAL void divergent_kernel(int* out) {
  if (threadIdx.x >= kBlock / 2) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// (e) divergent shuffle: half a warp skips it.
DK_GLOBAL void divergent_shuffle_kernel(float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// (e) a real timeout: thread 0 is slower than the barrier timeout.
DK_GLOBAL void slow_thread_kernel(int sleep_ms) {
  if (threadIdx.x == 0) std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
  __syncthreads();
}

// (e) a kernel thread throws while the others wait at a barrier.
DK_GLOBAL void throwing_kernel(unsigned bad_block, unsigned bad_thread) {
  if (blockIdx.x == bad_block && threadIdx.x == bad_thread) throw std::runtime_error("boom from the kernel");
  __syncthreads();
}

// (f) 16-byte packs: thread t copies pack t of src (offset by `shift` elements) to dst, doubling it.
template <class T>
DK_GLOBAL void pack_copy_kernel(const T* src, T* dst, int shift) {
  const unsigned t = blockIdx.x * blockDim.x + threadIdx.x;
  constexpr int n = dk::Pack16<T>::kSize;
  dk::Pack16<T> pack = dk::load16(src + shift + t * n);
  for (int j = 0; j < n; ++j) pack.v[j] = dk::from_float<T>(2.f * dk::to_float(pack.v[j]));
  dk::store16(dst + shift + t * n, pack);
}

// conversions inside a kernel (the same functions as on the host, but through a launch).
template <class T>
DK_GLOBAL void convert_kernel(const float* in, T* out, float* back) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  out[i] = dk::from_float<T>(in[i]);
  back[i] = dk::to_float(out[i]);
}

// ---- tests -------------------------------------------------------------------------------------------

void test_block_reduce() {
  const int grid = 5;
  std::vector<float> x(grid * kBlock);
  for (int i = 0; i < grid * kBlock; ++i) x[i] = float((i * 37) % 101) - 50.f;  // small integers: exact sums
  std::vector<float> sums(grid, -1.f), maxes(grid, -1.f);
  std::vector<unsigned> geometry(grid * 2, 0);
  for (int rep = 0; rep < 2; ++rep) {  // a second launch reuses the static shared arrays
    dk::emu::launch(dim3(grid), dim3(kBlock), 0, block_reduce_kernel<kBlock>, x.data(), sums.data(), maxes.data(),
                    geometry.data());
    for (int b = 0; b < grid; ++b) {
      float want_sum = 0.f, want_max = -INFINITY;
      for (int t = 0; t < kBlock; ++t) {
        want_sum += x[b * kBlock + t];
        want_max = std::fmax(want_max, x[b * kBlock + t]);
      }
      check(sums[b] == want_sum, "(a) block sum, block " + std::to_string(b) + ": " + std::to_string(sums[b]) +
                                     " != " + std::to_string(want_sum));
      check(maxes[b] == want_max, "(a) block max, block " + std::to_string(b));
      check(geometry[b * 2] == unsigned(grid) && geometry[b * 2 + 1] == unsigned(kBlock),
            "(a) gridDim.x / blockDim.x seen by the kernel");
    }
  }
}

void test_indices() {
  const dim3 grid(2, 3, 2), block(8, 4, 2);
  const unsigned nblocks = 12, nthreads = 64;
  std::vector<unsigned> out(nblocks * nthreads, 0xffffffffu);
  dk::emu::launch(grid, block, 0, index_kernel, out.data());
  bool ok = true;
  for (unsigned b = 0; b < nblocks; ++b)
    for (unsigned t = 0; t < nthreads; ++t) ok = ok && out[b * nthreads + t] == b * 100000 + t;
  check(ok, "(a) 3-D threadIdx / blockIdx cover every (block, thread) once");
}

template <class T>
void test_dynamic_smem_for() {
  const unsigned grid = 3, block = 96;
  std::vector<T> in(grid * block), out(grid * block, T(-1));
  for (unsigned i = 0; i < grid * block; ++i) in[i] = T(i * 3 + 1);
  std::vector<unsigned> fresh(block, 0);
  dk::emu::launch(dim3(grid), dim3(block), 2 * block * sizeof(T), rotate_kernel<T>, in.data(), out.data(),
                  fresh.data());
  bool ok = true, fresh_ok = true;
  for (unsigned b = 0; b < grid; ++b)
    for (unsigned t = 0; t < block; ++t) ok = ok && out[b * block + t] == in[b * block + (t + 1) % block];
  for (unsigned t = 0; t < block; ++t) fresh_ok = fresh_ok && fresh[t] == 1u;
  check(ok, std::string("(b) dynamic shared memory rotate, ") + (sizeof(T) == 4 ? "4" : "8") + "-byte elements");
  check(fresh_ok, "(b) dynamic shared memory starts zeroed and 16-byte aligned");
}

void test_partial_warp() {
  const int n = 48;
  std::vector<int> out(n * 4, -1);
  dk::emu::launch(dim3(2), dim3(n), 0, partial_warp_kernel, out.data());
  bool ok = true;
  for (int t = 0; t < n; ++t) {
    const int group = t / 16, want_sum = 16 * group * 16 + 120;  // sum of 16g .. 16g+15
    const int want_from3 = ((t / 32) * 32 + 3) * 10;
    const int want_down = (t % 16) + 4 < 16 ? t + 4 : t;
    ok = ok && out[t * 4] == want_sum && out[t * 4 + 1] == want_from3 && out[t * 4 + 2] == want_down &&
         out[t * 4 + 3] == n;
  }
  check(ok, "(c) partial warp (blockDim 48): shuffles within 16 lanes, __syncthreads, atomicAdd");
  std::vector<float> sink(n);
  check_throws([&] { dk::emu::launch(dim3(1), dim3(n), 0, partial_warp_sum_kernel, sink.data()); }, "does not exist",
               "(c) warp_sum on a partial warp reads a missing lane");
}

template <class T>
void test_packs_for(const char* name) {
  constexpr int n = dk::Pack16<T>::kSize;
  static_assert(sizeof(dk::Pack16<T>) == 16 && alignof(dk::Pack16<T>) == 16);
  const int threads = 64, count = threads * n + n;  // one spare pack for the shifted launch
  std::vector<dk::Pack16<T>> src_storage(count / n), dst_storage(count / n);  // 16-byte aligned
  T* src = reinterpret_cast<T*>(src_storage.data());
  T* dst = reinterpret_cast<T*>(dst_storage.data());
  for (int i = 0; i < count; ++i) src[i] = dk::from_float<T>(float(i % 97) - 48.f);
  const T* in = src;
  dk::emu::launch(dim3(2), dim3(threads / 2), 0, pack_copy_kernel<T>, in, dst, 0);
  bool ok = true;
  for (int i = 0; i < threads * n; ++i) ok = ok && dk::to_float(dst[i]) == 2.f * (float(i % 97) - 48.f);
  check(ok, std::string("(f) load16 / store16 move 16-byte packs of ") + name);
  // shift 1: every pack starts one element (2 or 4 bytes) past a 16-byte boundary
  check_throws([&] { dk::emu::launch(dim3(1), dim3(4), 0, pack_copy_kernel<T>, in, dst, 1); },
               "misaligned address: a 16-byte load",
               std::string("(f) a misaligned load16 of ") + name + " fails the launch");
}

void test_packs() {
  test_packs_for<float>("float");
  test_packs_for<dk::bf16>("bf16");
  test_packs_for<dk::half>("half");
}

struct Case {
  std::uint32_t in;
  std::uint16_t bf16, half;
  const char* what;
};

void test_conversions() {
  const Case cases[] = {
      {0x3f800000u, 0x3f80, 0x3c00, "1.0"},
      {0x80000000u, 0x8000, 0x8000, "-0.0"},
      {0x3f808000u, 0x3f80, 0x3c04, "bf16 tie, even below"},
      {0x3f818000u, 0x3f82, 0x3c0c, "bf16 tie, even above"},
      {0x3f808001u, 0x3f81, 0x3c04, "bf16 just above tie"},
      {0x3f801000u, 0x3f80, 0x3c00, "half tie, even below"},
      {0x3f803000u, 0x3f80, 0x3c02, "half tie, even above"},
      {0x3f801001u, 0x3f80, 0x3c01, "half just above tie"},
      {0xbf803000u, 0xbf80, 0xbc02, "negative half tie"},
      {0x7f7f0000u, 0x7f7f, 0x7c00, "bf16 max"},
      {0x7f7f7fffu, 0x7f7f, 0x7c00, "just below bf16 overflow tie"},
      {0x7f7f8000u, 0x7f80, 0x7c00, "bf16 overflow tie -> inf"},
      {0x7f7fffffu, 0x7f80, 0x7c00, "float max"},
      {0x477fe000u, 0x4780, 0x7bff, "65504 = half max"},
      {0x477fefffu, 0x4780, 0x7bff, "just below half overflow tie"},
      {0x477ff000u, 0x4780, 0x7c00, "65520: half overflow tie -> inf"},
      {0xc77ff000u, 0xc780, 0xfc00, "-65520 -> -inf"},
      {0x7f800000u, 0x7f80, 0x7c00, "inf"},
      {0xff800000u, 0xff80, 0xfc00, "-inf"},
      {0x7fc00000u, 0xffff, 0x7e00, "nan"},
      {0xffc00000u, 0xffff, 0xfe00, "-nan"},
      {0x7fa00000u, 0xffff, 0x7f00, "nan with payload"},
      {0x7f800001u, 0xffff, 0x7e00, "signalling nan"},
      {0x38800000u, 0x3880, 0x0400, "2^-14, smallest normal half"},
      {0x387fc000u, 0x3880, 0x03ff, "largest subnormal half"},
      {0x387fe000u, 0x3880, 0x0400, "tie: largest subnormal / smallest normal half"},
      {0x33800000u, 0x3380, 0x0001, "2^-24, smallest subnormal half"},
      {0x33000000u, 0x3300, 0x0000, "2^-25: half tie -> 0"},
      {0x33000001u, 0x3300, 0x0001, "just above 2^-25"},
      {0x33c00000u, 0x33c0, 0x0002, "3 * 2^-25: half tie -> 2"},
      {0xb3c00000u, 0xb3c0, 0x8002, "-3 * 2^-25"},
      {0x32ffffffu, 0x3300, 0x0000, "below 2^-25"},
      {0x00000001u, 0x0000, 0x0000, "smallest float subnormal"},
      {0x00008000u, 0x0000, 0x0000, "float subnormal: bf16 tie -> 0"},
      {0x00018000u, 0x0002, 0x0000, "float subnormal: bf16 tie -> 2"},
      {0x00008001u, 0x0001, 0x0000, "float subnormal above bf16 tie"},
      {0x007fffffu, 0x0080, 0x0000, "largest float subnormal -> smallest normal bf16"},
      {0x80018000u, 0x8002, 0x8000, "negative float subnormal"},
  };
  const int n = int(sizeof(cases) / sizeof(cases[0]));
  std::vector<float> in(n);
  for (int i = 0; i < n; ++i) in[i] = f_of(cases[i].in);
  std::vector<dk::bf16> b(n);
  std::vector<dk::half> h(n);
  std::vector<float> bback(n), hback(n);
  dk::emu::launch(dim3(1), dim3(n), 0, convert_kernel<dk::bf16>, in.data(), b.data(), bback.data());
  dk::emu::launch(dim3(1), dim3(n), 0, convert_kernel<dk::half>, in.data(), h.data(), hback.data());
  for (int i = 0; i < n; ++i) {
    check(dk::to_bits(b[i]) == cases[i].bf16,
          std::string("(d) bf16 of ") + cases[i].what + ": " + hex(dk::to_bits(b[i])) + " != " + hex(cases[i].bf16));
    check(dk::to_bits(h[i]) == cases[i].half,
          std::string("(d) half of ") + cases[i].what + ": " + hex(dk::to_bits(h[i])) + " != " + hex(cases[i].half));
  }
  check(dk::to_float(dk::from_bits<dk::half>(0x0001)) == std::ldexp(1.f, -24), "(d) half 0x0001 -> 2^-24");
  check(dk::to_float(dk::from_bits<dk::half>(0x7bff)) == 65504.f, "(d) half 0x7bff -> 65504");
  check(dk::to_float(dk::from_bits<dk::bf16>(0x0001)) == f_of(0x00010000u), "(d) bf16 0x0001 -> float subnormal");
  check(std::isnan(dk::to_float(dk::from_bits<dk::half>(0x7e00))), "(d) half NaN -> NaN");
  check(dk::to_float(1.5f) == 1.5f && dk::from_float<float>(1.5f) == 1.5f, "(d) float passes through");

  // Every 16-bit pattern: to_float is exact, so from_float must give the same bits back (NaNs stay NaN).
  bool round_trip = true;
  for (std::uint32_t p = 0; p < 0x10000u; ++p) {
    const auto bits = std::uint16_t(p);
    const float fb = dk::to_float(dk::from_bits<dk::bf16>(bits)), fh = dk::to_float(dk::from_bits<dk::half>(bits));
    const bool bnan = (p & 0x7fffu) > 0x7f80u, hnan = (p & 0x7fffu) > 0x7c00u;
    round_trip = round_trip && (bnan ? std::isnan(fb) : dk::to_bits(dk::from_float<dk::bf16>(fb)) == bits);
    round_trip = round_trip && (hnan ? std::isnan(fh) : dk::to_bits(dk::from_float<dk::half>(fh)) == bits);
  }
  check(round_trip, "(d) all 65536 bf16 and half patterns round-trip through float");

  // Random floats against an independent rule: the nearest of the two neighbours, ties to even.
  std::mt19937 rng(1234);
  bool nearest_ok = true;
  for (int i = 0; i < 200000 && nearest_ok; ++i) {
    std::uint32_t u = rng();
    if (i % 3) u = (u & 0x8fffffffu) | (i % 3 == 1 ? 0x30000000u : 0x40000000u);  // |f| in [2^-31, 2^32)
    const float f = f_of(u);
    if (std::isnan(f) || std::isinf(f)) continue;
    const double x = std::fabs(double(f));
    // bf16: candidates truncate(x) and the next pattern up.
    const std::uint16_t lo = std::uint16_t((bits_of(std::fabs(f)) >> 16));
    const double vlo = double(dk::to_float(dk::from_bits<dk::bf16>(lo)));
    const double vhi = lo == 0x7f7f ? std::ldexp(1.0, 128) : double(dk::to_float(dk::from_bits<dk::bf16>(lo + 1)));
    std::uint16_t want = (x - vlo < vhi - x || (x - vlo == vhi - x && !(lo & 1))) ? lo : std::uint16_t(lo + 1);
    want = std::uint16_t(want | ((u >> 16) & 0x8000u));
    nearest_ok = nearest_ok && dk::to_bits(dk::from_float<dk::bf16>(f)) == want;
    // half: scan by the spacing of the binade.
    const double ulp = x < std::ldexp(1.0, -14) ? std::ldexp(1.0, -24) : std::ldexp(1.0, std::ilogb(x) - 10);
    const double q = std::floor(x / ulp) * ulp, next = q + ulp;
    const double pick = (x - q < next - x || (x - q == next - x && std::fmod(q / ulp, 2.0) == 0.0)) ? q : next;
    const float got = std::fabs(dk::to_float(dk::from_float<dk::half>(f)));
    const double want_h = pick >= 65536.0 ? INFINITY : pick;
    nearest_ok = nearest_ok && double(got) == want_h;
  }
  check(nearest_ok, "(d) 200000 random floats round to the nearest bf16 / half, ties to even");
#ifdef __FLT16_MAX__
  bool f16_ok = true;
  for (int i = 0; i < 200000; ++i) {
    const float f = f_of(rng());
    if (std::isnan(f)) continue;
    const _Float16 ref = _Float16(f);
    std::uint16_t ref_bits;
    std::memcpy(&ref_bits, &ref, 2);
    f16_ok = f16_ok && dk::to_bits(dk::from_float<dk::half>(f)) == ref_bits;
  }
  check(f16_ok, "(d) half conversion matches the compiler's _Float16 on 200000 random floats");
#endif
}

void test_failures() {
  const unsigned saved = dk::emu::barrier_timeout_ms();
  dk::emu::set_barrier_timeout_ms(1500);
  std::vector<int> sink(kBlock, 0);
  std::vector<float> fsink(kBlock, 0.f);
  check_throws([&] { dk::emu::launch(dim3(3), dim3(kBlock), 0, divergent_kernel, sink.data()); }, "__syncthreads",
               "(e) divergent __syncthreads fails the launch", 1.5 + 5.0);
  check_throws([&] { dk::emu::launch(dim3(2), dim3(64), 0, divergent_shuffle_kernel, fsink.data()); }, "divergent",
               "(e) divergent warp shuffle fails the launch", 1.5 + 5.0);
  dk::emu::set_barrier_timeout_ms(100);
  check_throws([&] { dk::emu::launch(dim3(1), dim3(64), 0, slow_thread_kernel, 600); }, "__syncthreads timed out",
               "(e) a barrier wait longer than the timeout fails the launch", 0.6 + 5.0);
  dk::emu::set_barrier_timeout_ms(saved);
  check_throws([&] { dk::emu::launch(dim3(4), dim3(kBlock), 0, throwing_kernel, 2u, 77u); }, "boom from the kernel",
               "(e) an exception in a kernel thread is rethrown by launch");
  check_throws([&] { dk::emu::launch(dim3(1), dim3(2048), 0, index_kernel, nullptr); }, "invalid launch configuration",
               "(e) more than 1024 threads per block is refused");
  check_throws([] { __syncthreads(); }, "", "(e) __syncthreads outside a launch throws");

  // The emulator still works after the failures.
  test_block_reduce();
}

}  // namespace

int main() {
  test_block_reduce();
  test_indices();
  test_dynamic_smem_for<float>();
  test_dynamic_smem_for<double>();
  test_partial_warp();
  test_packs();
  test_conversions();
  test_failures();
  std::printf("selftest: %d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
