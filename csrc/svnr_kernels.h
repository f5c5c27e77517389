// Entry points the pybind11 module exposes. Tensors cross the boundary as raw device or host pointers
// plus sizes: the module links neither libtorch nor torch's CUDA headers, so it builds wherever a C++
// compiler (and optionally nvcc) exists and is independent of the installed torch's ABI. The Python side
// (svnr_fast/ops.py) allocates every tensor and passes the current CUDA stream.
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

// ---------------------------------------------------------------------------------------------------
// groupnorm_film (DESIGN.md §1.6): kernels in groupnorm_film_cpu.cpp / groupnorm_film_cuda.cu, Python
// glue in kernels/groupnorm_film.py.
// ---------------------------------------------------------------------------------------------------

// Storage dtype of h, out, grad_out and grad_h. Every other tensor (u, table, weight, bias, mean, rstd and
// the gradients of table/weight/bias) is in the compute dtype: float64 for float64 data, else float32.
enum DTypeCode : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

template <typename P>
P* as(std::uintptr_t address) { return reinterpret_cast<P*>(address); }

// Calls fn(storage value, std::bool_constant<silu>) with the storage type of `dtype`; the 16-bit types
// are the CPU's or CUDA's own (BFloat16T, Float16T).
template <typename BFloat16T, typename Float16T, typename Fn>
void dispatch_storage(int dtype, bool silu, Fn&& fn) {
  auto with_act = [&](auto storage) {
    if (silu)
      fn(storage, std::true_type{});
    else
      fn(storage, std::false_type{});
  };
  switch (dtype) {
    case kFloat32: return with_act(float{});
    case kFloat64: return with_act(double{});
    case kBFloat16: return with_act(BFloat16T{});
    case kFloat16: return with_act(Float16T{});
    default: throw std::invalid_argument("groupnorm_film: unknown dtype code " + std::to_string(dtype));
  }
}

struct GroupNormFilmShape {
  std::int64_t batch;
  std::int64_t channels;
  std::int64_t pixels;      // H * W
  std::int64_t groups;
  std::int64_t knots;       // K: table rows
  bool channels_last;       // h (and out, grad_out, grad_h) are NHWC in memory, else NCHW; both contiguous
  int dtype;                // DTypeCode of h
};

// Throws std::invalid_argument (a ValueError in Python) when the shape is not one the kernels accept.
void check_groupnorm_film_shape(const GroupNormFilmShape& shape);

// Pointers (all contiguous):
//   h, out, grad_out, grad_h    (B, C, H, W) in the storage dtype, NCHW or NHWC per shape.channels_last
//   u                           (B, H*W) warped time in knot units
//   table                       NCHW: (2C, K), i.e. the (K, 2C) [scale | shift] table transposed so that a
//                               channel's column is contiguous; NHWC: (K, 2C) as given
//   weight, bias                (C,)
//   mean, rstd                  (B, groups): written by the forward, read by the backward
//   grad_table                  (K, 2C) whatever the layout
void groupnorm_film_forward_cpu(const GroupNormFilmShape& shape, std::uintptr_t h, std::uintptr_t u,
                                std::uintptr_t table, std::uintptr_t weight, std::uintptr_t bias,
                                std::uintptr_t out, std::uintptr_t mean, std::uintptr_t rstd, double eps,
                                bool silu, int threads);
void groupnorm_film_backward_cpu(const GroupNormFilmShape& shape, std::uintptr_t grad_out, std::uintptr_t h,
                                 std::uintptr_t u, std::uintptr_t table, std::uintptr_t weight,
                                 std::uintptr_t bias, std::uintptr_t mean, std::uintptr_t rstd,
                                 std::uintptr_t grad_h, std::uintptr_t grad_table, std::uintptr_t grad_weight,
                                 std::uintptr_t grad_bias, bool silu, int threads);

#ifdef SVNR_WITH_CUDA
// Bytes of device scratch the CUDA forward and backward need for this shape (the caller allocates it).
std::int64_t groupnorm_film_cuda_workspace_bytes(const GroupNormFilmShape& shape);
// Kernels run on `device` and `stream` (torch's current stream); grad_table must be zero-filled on that
// stream before the backward, which accumulates into it with atomics.
void groupnorm_film_forward_cuda(const GroupNormFilmShape& shape, std::uintptr_t h, std::uintptr_t u,
                                 std::uintptr_t table, std::uintptr_t weight, std::uintptr_t bias,
                                 std::uintptr_t out, std::uintptr_t mean, std::uintptr_t rstd, double eps,
                                 bool silu, std::uintptr_t workspace, int device, std::uintptr_t stream);
void groupnorm_film_backward_cuda(const GroupNormFilmShape& shape, std::uintptr_t grad_out, std::uintptr_t h,
                                  std::uintptr_t u, std::uintptr_t table, std::uintptr_t weight,
                                  std::uintptr_t bias, std::uintptr_t mean, std::uintptr_t rstd,
                                  std::uintptr_t grad_h, std::uintptr_t grad_table, std::uintptr_t grad_weight,
                                  std::uintptr_t grad_bias, bool silu, std::uintptr_t workspace,
                                  int device, std::uintptr_t stream);
#endif

}  // namespace svnr
