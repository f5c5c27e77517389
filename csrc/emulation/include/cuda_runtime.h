// CPU emulation of the CUDA execution model, just enough of it for csrc/groupnorm_film_cuda.cu: see README.md.
#pragma once
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
typedef int cudaError_t;
enum { cudaSuccess = 0 };
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97, cudaDevAttrMultiProcessorCount = 16 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorName(cudaError_t) { return "emu"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emu"; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? (getenv("EMU_SMS") ? atoi(getenv("EMU_SMS")) : 132) : 227 * 1024;
  return cudaSuccess;
}
extern size_t g_emu_max_dynamic_shared;
template <class F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int v) { g_emu_max_dynamic_shared = v; return cudaSuccess; }

namespace emu {
enum State { RUNNABLE, AT_BARRIER, AT_WARP, DONE, FAILED };
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  int linear;
  State state;
};
extern Fiber* current;
extern ucontext_t scheduler;
extern dim3 block_idx, block_dim, grid_dim;
extern std::vector<unsigned char> dynamic_shared;
extern std::vector<std::uint64_t> shuffle_slots;
extern long long launches, blocks_run;
void run_grid(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);
// A violation of the execution model: raised as std::runtime_error (a Python RuntimeError) from the launch; a
// fiber that hits one stops and the scheduler raises it.
[[noreturn]] void fail(const std::string& what);

inline void yield(State s) {
  current->state = s;
  swapcontext(&current->ctx, &scheduler);
}
}  // namespace emu

#define threadIdx (emu::current->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::yield(emu::AT_BARRIER); }

// A warp-wide exchange: every lane publishes `bits`, waits until all 32 lanes have, and reads what `read`
// makes of the published values; then waits again so that no lane overwrites its slot before all have read.
template <class Read>
std::uint64_t emu_warp_exchange(unsigned mask, std::uint64_t bits, const char* what, Read&& read) {
  if (mask != 0xFFFFFFFFu) emu::fail(std::string(what) + " with a partial mask");
  const int lin = emu::current->linear, warp_base = lin & ~31;
  emu::shuffle_slots[lin] = bits;
  emu::yield(emu::AT_WARP);
  const std::uint64_t out = read(&emu::shuffle_slots[warp_base], lin & 31);
  emu::yield(emu::AT_WARP);
  return out;
}

template <class T>
T emu_shuffle(unsigned mask, T v, const char* what, int (*source)(int lane, int arg), int arg) {
  static_assert(sizeof(T) <= 8, "slot");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = emu_warp_exchange(mask, bits, what, [&](const std::uint64_t* slots, int lane) {
    const int from = source(lane, arg);
    return slots[from >= 0 && from < 32 ? from : lane];   // out of range: the lane's own value, as on a GPU
  });
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
  return emu_shuffle(mask, v, "__shfl_xor_sync", [](int lane, int a) { return lane ^ a; }, offset);
}
template <class T>
T __shfl_sync(unsigned mask, T v, int source) {
  return emu_shuffle(mask, v, "__shfl_sync", [](int, int a) { return a & 31; }, source);
}
template <class T>
T __shfl_up_sync(unsigned mask, T v, int delta) {
  return emu_shuffle(mask, v, "__shfl_up_sync", [](int lane, int a) { return lane - a; }, delta);
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, int delta) {
  return emu_shuffle(mask, v, "__shfl_down_sync", [](int lane, int a) { return lane + a; }, delta);
}

// The lanes whose value equals this lane's.
template <class T>
unsigned __match_any_sync(unsigned mask, T v) {
  static_assert(sizeof(T) <= 8, "slot");
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return unsigned(emu_warp_exchange(mask, bits, "__match_any_sync", [&](const std::uint64_t* slots, int) {
    unsigned same = 0;
    for (int l = 0; l < 32; ++l) same |= unsigned(slots[l] == bits) << l;
    return std::uint64_t(same);
  }));
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
  emu_warp_exchange(mask, 0, "__syncwarp", [](const std::uint64_t*, int) { return std::uint64_t(0); });
}

inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }

// --use_fast_math's intrinsics, exactly rounded here (the emulation checks logic, not the GPU's ulps)
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }

inline float atomicAdd(float* p, float v) { float old = *p; *p = old + v; return old; }
inline double atomicAdd(double* p, double v) { double old = *p; *p = old + v; return old; }

inline unsigned char* svnr_emu_dynamic_shared() { return emu::dynamic_shared.data(); }

template <class K>
struct EmuLaunch {
  const char* name;
  K kernel;
  dim3 grid, block;
  size_t shared;
  template <class... A>
  void operator()(A... args) {
    ++emu::launches;
    if (getenv("EMU_TRACE")) std::fprintf(stderr, "launch %s grid %u,%u,%u block %u,%u\n", name, grid.x, grid.y, grid.z, block.x, block.y);
    if (shared > 48 * 1024 && shared > g_emu_max_dynamic_shared)
      emu::fail(std::string(name) + ": " + std::to_string(shared) + " bytes of dynamic shared memory without the opt-in");
    if (block.x * block.y * block.z > 1024 || (block.x * block.y * block.z) % 32)
      emu::fail(std::string(name) + ": a block of more than 1024 threads or not whole warps");
    emu::run_grid(grid, block, shared, [&] { kernel(args...); });
  }
};
template <class K>
EmuLaunch<K> svnr_launch(const char* name, K kernel, dim3 grid, dim3 block, size_t shared = 0, cudaStream_t = nullptr) {
  return EmuLaunch<K>{name, kernel, grid, block, shared};
}
