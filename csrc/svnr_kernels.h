// Entry points the pybind11 module exposes. Tensors cross the boundary as raw device or host addresses
// plus sizes: the module links neither libtorch nor torch's CUDA headers, so it builds wherever a C++
// compiler (and optionally nvcc) exists and is independent of the installed torch's ABI. The Python glue
// allocates every tensor and passes the thread count (CPU) or torch's current stream (CUDA); bindings.cpp
// turns its arguments into one argument struct per op, which is all the kernels see.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace svnr {

#ifdef SVNR_WITH_CUDA
int cuda_runtime_version();
int cuda_driver_version();
#endif

// Storage dtype of a tensor. Schedule math and every small tensor (tables, per-image parameters, statistics)
// use the compute dtype of the data: float64 for float64 data, else float32.
enum DTypeCode : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Calls fn(storage value) with the storage type of `dtype`; the 16-bit types are the CPU's or CUDA's own
// (BFloat16T, Float16T). `op` names the caller in the error for an unknown code.
template <typename BFloat16T, typename Float16T, typename Fn>
void dispatch_dtype(int dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case kFloat32: return fn(float{});
    case kFloat64: return fn(double{});
    case kBFloat16: return fn(BFloat16T{});
    case kFloat16: return fn(Float16T{});
    default: throw std::invalid_argument(std::string(op) + ": unknown dtype code " + std::to_string(dtype));
  }
}

// Calls fn(std::bool_constant<silu>).
template <typename Fn>
void dispatch_act(bool silu, Fn&& fn) {
  if (silu)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

// ---------------------------------------------------------------------------------------------------
// groupnorm_film (DESIGN.md §1.6): kernels in groupnorm_film_cpu.cpp / groupnorm_film_cuda.cu.
// ---------------------------------------------------------------------------------------------------

enum class Pass : int { kForward = 0, kBackward = 1 };

// One forward or backward call. Image tensors (h, out, grad_out, grad_h) are (B, C, H, W) in the storage
// dtype, NCHW- or NHWC-contiguous per channels_last; every other tensor is contiguous, in the compute dtype:
//   u             (B, H*W) warped time in knot units
//   table         (K, 2C) [scale | shift] rows
//   weight, bias  (C,)
//   mean, rstd    (B, groups): written by the forward, read by the backward
//   grad_table    (K, 2C); grad_weight, grad_bias (C,)
// The forward reads h, u, table, weight, bias and writes out, mean, rstd; the backward reads grad_out too,
// and mean and rstd, and writes the four gradients. Pointers a pass does not use may be null.
struct GroupNormFilmArgs {
  std::int64_t batch = 0, channels = 0, pixels = 0;   // B, C, H * W
  std::int64_t groups = 0, knots = 0;                 // knots: K, the table's rows
  bool channels_last = false;
  int dtype = kFloat32;                               // DTypeCode of the image tensors
  const void* h = nullptr;
  const void* u = nullptr;
  const void* table = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
  void* out = nullptr;
  void* mean = nullptr;
  void* rstd = nullptr;
  const void* grad_out = nullptr;
  void* grad_h = nullptr;
  void* grad_table = nullptr;
  void* grad_weight = nullptr;
  void* grad_bias = nullptr;
  double eps = 1e-5;
  bool silu = true;
};

// Throws std::invalid_argument (a ValueError in Python) when the shape is not one the kernels accept.
void check_groupnorm_film_shape(const GroupNormFilmArgs& args);

void groupnorm_film_cpu(Pass pass, const GroupNormFilmArgs& args, int threads);

#ifdef SVNR_WITH_CUDA
struct CudaLaunch {
  void* workspace;   // groupnorm_film_cuda_workspace_bytes(args) of device scratch, allocated by the caller
  int device;
  void* stream;      // torch's current stream on `device`
};

std::int64_t groupnorm_film_cuda_workspace_bytes(const GroupNormFilmArgs& args);
// grad_table must be zero-filled on the stream before the backward, which accumulates into it with atomics.
void groupnorm_film_cuda(Pass pass, const GroupNormFilmArgs& args, const CudaLaunch& launch);
#endif

}  // namespace svnr
