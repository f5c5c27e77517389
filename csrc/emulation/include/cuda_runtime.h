// CPU emulation of the CUDA execution model, just enough of it for csrc/groupnorm_film_cuda.cu: see README.md.
#pragma once
#include <ucontext.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int offset) {
  if (mask != 0xFFFFFFFFu) emu::fail("__shfl_xor_sync with a partial mask");
  static_assert(sizeof(T) <= 8, "slot");
  const int lin = emu::current->linear, lane = lin & 31, warp_base = lin & ~31;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::shuffle_slots[lin] = bits;
  emu::yield(emu::AT_WARP);
  T out;
  std::uint64_t other = emu::shuffle_slots[warp_base + (lane ^ offset)];
  std::memcpy(&out, &other, sizeof(T));
  emu::yield(emu::AT_WARP);
  return out;
}

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
