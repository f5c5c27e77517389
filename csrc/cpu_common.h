// What the CPU kernel sources share: storage types, row loads and stores in any dtype and stride, thread
// counts, buffers and in-kernel normals.
//
// The kernel sources are compiled once per instruction set (CMakeLists.txt). Everything they define lives in
// namespace svnr::SVNR_CPU_NAMESPACE or has internal linkage (the anonymous namespace below, the static
// functions of svnr_math.h, std::vector with the local allocator), so that no function compiled for one
// instruction set can stand in for another's at link time; CMakeLists.txt checks the objects for shared
// (weak) symbols. Kernels work on rows: a tile of pixels of one (image, channel) is loaded into a buffer in the
// compute type, processed by loops over contiguous memory that the compiler vectorises, and stored.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"
#include "svnr_kernels.h"
#include "svnr_math.h"

#ifndef SVNR_CPU_NAMESPACE
#error "the CPU kernels are compiled through CMakeLists.txt, which defines SVNR_CPU_NAMESPACE per instruction set"
#endif

namespace svnr {
namespace SVNR_CPU_NAMESPACE {
namespace {

using std::int64_t;

struct BFloat16 {
  std::uint16_t bits;
};
struct Float16 {
  std::uint16_t bits;
};

inline float load(float x) { return x; }
inline double load(double x) { return x; }
inline float load(BFloat16 x) { return math::bf16_to_float(x.bits); }
inline float load(Float16 x) { return math::fp16_to_float(x.bits); }

// Rounded to nearest even, as torch's .to() rounds.
inline void store(float& dst, float x) { dst = x; }
inline void store(float& dst, double x) { dst = float(x); }
inline void store(double& dst, double x) { dst = x; }
inline void store(double& dst, float x) { dst = x; }
inline void store(BFloat16& dst, float x) { dst.bits = math::float_to_bf16(x); }
inline void store(Float16& dst, float x) { dst.bits = math::float_to_fp16(x); }

// Compute type of a storage type: double for double, else float.
template <typename S>
using Compute = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Calls fn(storage value) for a DTypeCode.
template <typename Fn>
void dispatch(int dtype, const char* op, Fn&& fn) {
  dispatch_dtype<BFloat16, Float16>(dtype, op, fn);
}

// Calls fn(compute value): double for float64 data, else float.
template <typename Fn>
void dispatch_compute(int dtype, Fn&& fn) {
  if (dtype == kFloat64)
    fn(double{});
  else
    fn(float{});
}

// An allocator under a name of this translation unit, so that a std::vector of it has internal linkage. It
// default-initialises: Buffer<float>(n) is not zero-filled (Buffer<float>(n, 0.0f) is).
template <typename T>
struct LocalAllocator {
  using value_type = T;
  LocalAllocator() = default;
  template <typename U>
  LocalAllocator(const LocalAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p); }
  template <typename U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(static_cast<Args&&>(args)...);
  }
  template <typename U>
  bool operator==(const LocalAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const LocalAllocator<U>&) const { return false; }
};

template <typename T>
using Buffer = std::vector<T, LocalAllocator<T>>;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Below this many elements of work a kernel runs on the calling thread: waking OpenMP threads costs more.
constexpr int64_t kParallelWork = 32768;

inline int thread_count(int requested, int64_t work) {
  if (work < kParallelWork || requested < 1) return 1;
  return requested;
}

// Pixels per tile of the row kernels: a few rows of this many values stay in L1 together.
constexpr int64_t kTile = 1024;

// n values of a strided row, converted to the compute type T.
template <typename S, typename T>
void load_row_as(const S* src, int64_t stride, int64_t n, T* dst) {
  if (stride == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = T(load(src[i]));
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = T(load(src[i * stride]));
  }
}

// Pixels [p, p + n) of (image b, channel c) of a strided tensor, in the compute type T.
template <typename T>
void load_row(const Strided& view, int64_t b, int64_t c, int64_t p, int64_t n, T* dst) {
  dispatch(view.dtype, "load", [&](auto storage) {
    using S = decltype(storage);
    const S* src = static_cast<const S*>(view.data) + b * view.stride_b + c * view.stride_c + p * view.stride_p;
    load_row_as(src, view.stride_p, n, dst);
  });
}

// n values stored at element `offset` of a contiguous tensor of `dtype`.
template <typename T>
void store_row(void* base, int dtype, int64_t offset, const T* src, int64_t n) {
  dispatch(dtype, "store", [&](auto storage) {
    using S = decltype(storage);
    S* dst = static_cast<S*>(base) + offset;
    if constexpr (std::is_same_v<T, double> && !std::is_floating_point_v<S>) {
      for (int64_t i = 0; i < n; ++i) store(dst[i], float(src[i]));   // never used: 16-bit data computes in float
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) store(dst[i], src[i]);
    }
  });
}

// N(0, 1) draws for the pixels [p, p + n) of one stream, as kernels/_triton_common.py `normals`: one
// Philox-4x32-10 call per four consecutive pixels, key = seed, counter = (pixel / 4, stream, offset_lo,
// offset_hi); pixel 4q + j takes draw j of quad q. A draw depends on (seed, offset, stream, pixel) only.
// p is a multiple of 4 and dst has room for n rounded up to a multiple of 4.
inline void normals_row(std::uint64_t seed, std::uint64_t offset, std::uint64_t stream, int64_t p, int64_t n,
                        float* dst) {
  const std::uint32_t key0 = std::uint32_t(seed), key1 = std::uint32_t(seed >> 32);
  const std::uint32_t offset_lo = std::uint32_t(offset), offset_hi = std::uint32_t(offset >> 32);
  const std::uint32_t first_quad = std::uint32_t(p / 4), quads = std::uint32_t(ceil_div(n, 4));
#pragma omp simd
  for (std::uint32_t q = 0; q < quads; ++q) {
    const math::Philox r = math::philox4x32_10(first_quad + q, std::uint32_t(stream), offset_lo, offset_hi, key0, key1);
    const math::NormalPair first = math::box_muller(r.x0, r.x1), second = math::box_muller(r.x2, r.x3);
    dst[4 * q] = first.a;
    dst[4 * q + 1] = first.b;
    dst[4 * q + 2] = second.a;
    dst[4 * q + 3] = second.b;
  }
}

// gamma of n time values (in place allowed).
template <typename T>
void gamma_row(const T* tau, int64_t n, const T* table, int last, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = math::gamma_at(tau[i], table, last);
}

// tau(v) of n variances: the binary search one step at a time over the whole row (each step a vectorised
// loop of table gathers from L1), then the segment's inverse. segment: scratch of n ints.
template <typename T>
void time_row(const T* v, int64_t n, const T* table, int last, int* segment, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) segment[i] = 0;
  for (int step = math::search_top(last); step > 0; step >>= 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) segment[i] = math::search_step(segment[i], step, v[i], table, last);
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = math::time_on_segment(v[i], segment[i], table, last);
}

}  // namespace
}  // namespace SVNR_CPU_NAMESPACE
}  // namespace svnr
