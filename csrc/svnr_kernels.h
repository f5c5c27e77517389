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

// Throws std::invalid_argument naming `op` and the code (out of line: the CPU kernel objects instantiate no
// std::string code, cpu_common.h).
[[noreturn]] void throw_unknown_dtype(const char* op, int dtype);

// Calls fn(storage value) with the storage type of `dtype`; the 16-bit types are the CPU's or CUDA's own
// (BFloat16T, Float16T). `op` names the caller in the error for an unknown code.
template <typename BFloat16T, typename Float16T, typename Fn>
void dispatch_dtype(int dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case kFloat32: return fn(float{});
    case kFloat64: return fn(double{});
    case kBFloat16: return fn(BFloat16T{});
    case kFloat16: return fn(Float16T{});
    default: throw_unknown_dtype(op, dtype);
  }
}

// Calls fn(std::bool_constant<value>).
template <typename Fn>
void dispatch_bool(bool value, Fn&& fn) {
  if (value)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

// Calls fn(std::bool_constant<silu>).
template <typename Fn>
void dispatch_act(bool silu, Fn&& fn) {
  dispatch_bool(silu, fn);
}

// ---------------------------------------------------------------------------------------------------
// CPU kernels: compiled once per instruction set (CMakeLists.txt), one chosen at run time (cpu_dispatch.cpp)
// ---------------------------------------------------------------------------------------------------

// The instruction set the CPU kernels run with: the best one compiled in that this CPU supports ("avx512",
// "avx2" or "baseline"), or the one SVNR_FAST_CPU_ISA names (read at the first call).
const char* cpu_isa();
// Comma-separated instruction sets compiled in that this CPU supports, best first.
std::string cpu_isas();
// Switches to `name`; throws std::invalid_argument when it is not one of cpu_isas().
void set_cpu_isa(const std::string& name);

// A (B, C, H*W) view of an image-like tensor: element (b, c, p), p = h * W + w, sits at data + b * stride_b +
// c * stride_c + p * stride_p elements. That covers every layout whose (H, W) plane is linear (NCHW, NHWC and
// their batch or channel slices); a time map shared by the channels has stride_c = 0.
struct Strided {
  const void* data = nullptr;
  int dtype = kFloat32;
  std::int64_t stride_b = 0, stride_c = 0, stride_p = 1;
};

// A variance table (DESIGN.md §1.2): last + 1 strictly increasing entries in the compute dtype.
struct Table {
  const void* data = nullptr;
  int last = 0;   // T
};

// ---------------------------------------------------------------------------------------------------
// Schedule lookups (DESIGN.md §1.2-1.3): kernels in lookup_cpu.cpp
// ---------------------------------------------------------------------------------------------------

enum class Lookup : int { kGamma = 0, kTimeFromVariance = 1, kTimeMap = 2 };

// gamma and time_from_variance: elementwise over input viewed as (B, C, H*W) (any shape, flattened:
// (1, 1, n)); time_map: over the channel maximum of the (B, C, H*W) variance. Input, table and out are in the
// compute dtype `dtype` (float32 or float64); out is contiguous, (B, C, H*W) or, for time_map, (B, 1, H*W).
struct LookupArgs {
  Lookup op = Lookup::kGamma;
  std::int64_t batch = 0, channels = 0, pixels = 0;
  int dtype = kFloat32;
  Strided input;
  Table table;
  void* out = nullptr;
};

void lookup_cpu(const LookupArgs& args, int threads);

// ---------------------------------------------------------------------------------------------------
// reverse_step (DESIGN.md §1.5): kernel in reverse_step_cpu.cpp
// ---------------------------------------------------------------------------------------------------

// x, eps_hat, z (B, C, H, W) in any float dtype; tau (B, 1, H, W) or (B, C, H, W) (per_channel) in float32 or
// float64; delta (B,) and the table in the compute dtype of x. Outputs contiguous: x_new and x0_hat (when not
// null) in x's dtype, tau_new like tau in tau's dtype. z.data null: z is drawn from (seed, offset) (not at all
// when eta = 0).
struct ReverseStepArgs {
  std::int64_t batch = 0, channels = 0, pixels = 0;
  Strided x, eps_hat, z, tau;
  bool per_channel = false;
  const void* delta = nullptr;
  Table table;
  void* x_new = nullptr;
  void* tau_new = nullptr;
  void* x0_hat = nullptr;
  double eta = 1.0;
  bool clamp = false;
  double clamp_min = 0.0, clamp_max = 0.0;
  std::uint64_t seed = 0, offset = 0;
};

void reverse_step_cpu(const ReverseStepArgs& args, int threads);

// ---------------------------------------------------------------------------------------------------
// training_sample (DESIGN.md §1.4): kernel in training_sample_cpu.cpp
// ---------------------------------------------------------------------------------------------------

// x0, eps_T, eps_prime (B, C, H, W) in any float dtype; sigma_r, sigma_s, u (B,) and the table in the compute
// dtype of x0. Outputs contiguous: y, x_t, target in x0's dtype, tau (B, 1, H, W) or (B, C, H, W)
// (per_channel) in the compute dtype. A noise whose data is null is drawn from (seed, offset).
struct TrainingSampleArgs {
  std::int64_t batch = 0, channels = 0, pixels = 0;
  Strided x0, eps_T, eps_prime;
  const void* sigma_r = nullptr;
  const void* sigma_s = nullptr;
  const void* u = nullptr;
  Table table;
  void* y = nullptr;
  void* x_t = nullptr;
  void* tau = nullptr;
  void* target = nullptr;
  bool correlated = true, per_channel = false, batch_t0 = false;
  double min_std = 0.0;
  std::uint64_t seed = 0, offset = 0;
};

void training_sample_cpu(const TrainingSampleArgs& args, int threads);

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
  // false: GroupNorm + act only (svnr::groupnorm_silu); u, table and grad_table unused, knots 0. Both kernels
  // compile this variant separately (WithFilm = false), with no FiLM code in it.
  bool film = true;
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
