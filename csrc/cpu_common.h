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

#if defined(__SSE2__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

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

// Asks Linux to back a large output with 2 MB pages before it is first written. Fresh memory from torch's CPU
// allocator (malloc, which maps large blocks anew each time) costs one page fault per 4 KB page when first
// written: filling a new 50 MB buffer took 39 ms, 7.6 ms after this advice (this machine, transparent huge pages
// in `madvise` mode), where a copy_ into an existing buffer of that size takes 3 ms. Advice only: the data are
// untouched, and nothing changes where transparent huge pages are off.
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  using Address = std::uintptr_t;
  constexpr Address kHuge = Address(2) << 20;
  if (data == nullptr || bytes < int64_t(2 * kHuge)) return;
  const Address begin = (reinterpret_cast<Address>(data) + kHuge - 1) & ~(kHuge - 1);
  const Address end = (reinterpret_cast<Address>(data) + Address(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// Bytes of one element of a DTypeCode.
inline int64_t element_size(int dtype) { return dtype == kFloat64 ? 8 : dtype == kFloat32 ? 4 : 2; }

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

// The DTypeCode of a compute type.
template <typename T>
constexpr int dtype_code() {
  return std::is_same_v<T, double> ? kFloat64 : kFloat32;
}

// Pixels [p, p + n) of (image b, channel c) in the compute type T: the tensor's own memory where that already is
// a contiguous row of T, else a copy converted into `scratch`.
template <typename T>
const T* read_row(const Strided& view, int64_t b, int64_t c, int64_t p, int64_t n, T* scratch) {
  if (view.dtype == dtype_code<T>() && view.stride_p == 1)
    return static_cast<const T*>(view.data) + b * view.stride_b + c * view.stride_c + p;
  load_row(view, b, c, p, n, scratch);
  return scratch;
}

// Where to compute n results for element `offset` of a contiguous output of `dtype`: the output itself when it
// holds T, else `scratch`, which written_row then converts into it.
template <typename T>
T* output_row(void* base, int dtype, int64_t offset, T* scratch) {
  return dtype == dtype_code<T>() ? static_cast<T*>(base) + offset : scratch;
}

template <typename T>
void written_row(void* base, int dtype, int64_t offset, const T* row, int64_t n) {
  if (dtype != dtype_code<T>()) store_row(base, dtype, offset, row, n);
}

// Philox-4x32-10 of the counters (first + q, c1, c2, c3) under key (k0, k1) for q in [0, quads): the four
// outputs of counter q in out0[q] .. out3[q]; the numbers of math::philox4x32_10. The rounds' 32 x 32 -> 64-bit
// products are done lane-wise, even and odd lanes apart, with the widest integer vectors the instruction set
// has: GCC's own vectorisation of math::philox4x32_10 shuffles across lanes at every round (2.1x slower with
// AVX-512 and no faster than scalar code with AVX2, measured per normal draw).
#if defined(__AVX512F__)
struct Lanes {
  using V = __m512i;
  static constexpr int kWidth = 16;
  static V set1(std::uint32_t x) { return _mm512_set1_epi32(int(x)); }
  static V iota() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static V low_halves() { return _mm512_set1_epi64(0xFFFFFFFFll); }
  static V mul_even(V a, V b) { return _mm512_mul_epu32(a, b); }
  static V shift_down(V a) { return _mm512_srli_epi64(a, 32); }
  static V shift_up(V a) { return _mm512_slli_epi64(a, 32); }
  static V and_(V a, V b) { return _mm512_and_si512(a, b); }
  static V andnot(V a, V b) { return _mm512_andnot_si512(a, b); }
  static V or_(V a, V b) { return _mm512_or_si512(a, b); }
  static V xor_(V a, V b) { return _mm512_xor_si512(a, b); }
  static V add(V a, V b) { return _mm512_add_epi32(a, b); }
  static void store(std::uint32_t* p, V v) { _mm512_storeu_si512(p, v); }
};
#elif defined(__AVX2__)
struct Lanes {
  using V = __m256i;
  static constexpr int kWidth = 8;
  static V set1(std::uint32_t x) { return _mm256_set1_epi32(int(x)); }
  static V iota() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static V low_halves() { return _mm256_set1_epi64x(0xFFFFFFFFll); }
  static V mul_even(V a, V b) { return _mm256_mul_epu32(a, b); }
  static V shift_down(V a) { return _mm256_srli_epi64(a, 32); }
  static V shift_up(V a) { return _mm256_slli_epi64(a, 32); }
  static V and_(V a, V b) { return _mm256_and_si256(a, b); }
  static V andnot(V a, V b) { return _mm256_andnot_si256(a, b); }
  static V or_(V a, V b) { return _mm256_or_si256(a, b); }
  static V xor_(V a, V b) { return _mm256_xor_si256(a, b); }
  static V add(V a, V b) { return _mm256_add_epi32(a, b); }
  static void store(std::uint32_t* p, V v) { _mm256_storeu_si256(reinterpret_cast<V*>(p), v); }
};
#elif defined(__SSE2__)
struct Lanes {
  using V = __m128i;
  static constexpr int kWidth = 4;
  static V set1(std::uint32_t x) { return _mm_set1_epi32(int(x)); }
  static V iota() { return _mm_setr_epi32(0, 1, 2, 3); }
  static V low_halves() { return _mm_set1_epi64x(0xFFFFFFFFll); }
  static V mul_even(V a, V b) { return _mm_mul_epu32(a, b); }
  static V shift_down(V a) { return _mm_srli_epi64(a, 32); }
  static V shift_up(V a) { return _mm_slli_epi64(a, 32); }
  static V and_(V a, V b) { return _mm_and_si128(a, b); }
  static V andnot(V a, V b) { return _mm_andnot_si128(a, b); }
  static V or_(V a, V b) { return _mm_or_si128(a, b); }
  static V xor_(V a, V b) { return _mm_xor_si128(a, b); }
  static V add(V a, V b) { return _mm_add_epi32(a, b); }
  static void store(std::uint32_t* p, V v) { _mm_storeu_si128(reinterpret_cast<V*>(p), v); }
};
#endif

inline void philox_counters(std::uint32_t first, int64_t quads, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3,
                            std::uint32_t k0, std::uint32_t k1, std::uint32_t* out0, std::uint32_t* out1,
                            std::uint32_t* out2, std::uint32_t* out3) {
  int64_t q = 0;
#if defined(__AVX512F__) || defined(__AVX2__) || defined(__SSE2__)
  using V = Lanes::V;
  const V m0 = Lanes::set1(0xD2511F53u), m1 = Lanes::set1(0xCD9E8D57u), low = Lanes::low_halves();
  V key0[10], key1[10];
  for (int round = 0; round < 10; ++round) {
    key0[round] = Lanes::set1(k0 + std::uint32_t(round) * 0x9E3779B9u);
    key1[round] = Lanes::set1(k1 + std::uint32_t(round) * 0xBB67AE85u);
  }
  // hi and lo halves of the products a * m per 32-bit lane: even lanes' from mul_even(a), odd lanes' from
  // mul_even of a shifted down
  auto mulhilo = [&](V a, V m, V& hi, V& lo) {
    const V even = Lanes::mul_even(a, m), odd = Lanes::mul_even(Lanes::shift_down(a), m);
    lo = Lanes::or_(Lanes::and_(even, low), Lanes::shift_up(odd));
    hi = Lanes::or_(Lanes::shift_down(even), Lanes::andnot(low, odd));
  };
  const V iota = Lanes::iota(), v1 = Lanes::set1(c1), v2 = Lanes::set1(c2), v3 = Lanes::set1(c3);
  for (; q + Lanes::kWidth <= quads; q += Lanes::kWidth) {
    V x0 = Lanes::add(Lanes::set1(first + std::uint32_t(q)), iota), x1 = v1, x2 = v2, x3 = v3;
    for (int round = 0; round < 10; ++round) {
      V hi0, lo0, hi1, lo1;
      mulhilo(x0, m0, hi0, lo0);
      mulhilo(x2, m1, hi1, lo1);
      x0 = Lanes::xor_(Lanes::xor_(hi1, x1), key0[round]);
      x1 = lo1;
      x2 = Lanes::xor_(Lanes::xor_(hi0, x3), key1[round]);
      x3 = lo0;
    }
    Lanes::store(out0 + q, x0);
    Lanes::store(out1 + q, x1);
    Lanes::store(out2 + q, x2);
    Lanes::store(out3 + q, x3);
  }
#endif
  for (; q < quads; ++q) {
    const math::Philox r = math::philox4x32_10(first + std::uint32_t(q), c1, c2, c3, k0, k1);
    out0[q] = r.x0;
    out1[q] = r.x1;
    out2[q] = r.x2;
    out3[q] = r.x3;
  }
}

// Scratch of normals_row for n pixels: the Philox outputs of their quads.
struct NormalScratch {
  Buffer<std::uint32_t> bits;
  explicit NormalScratch(int64_t n) : bits(4 * ceil_div(n, 4) + 4) {}
};

// N(0, 1) draws for the pixels [p, p + n) of one stream, as kernels/_triton_common.py `normals`: one
// Philox-4x32-10 call per four consecutive pixels, key = seed, counter = (pixel / 4, stream, offset_lo,
// offset_hi); pixel 4q + j takes draw j of quad q. A draw depends on (seed, offset, stream, pixel) only.
// p is a multiple of 4 and dst has room for n rounded up to a multiple of 4.
inline void normals_row(std::uint64_t seed, std::uint64_t offset, std::uint64_t stream, int64_t p, int64_t n,
                        NormalScratch& scratch, float* dst) {
  const int64_t quads = ceil_div(n, 4);
  std::uint32_t* r0 = scratch.bits.data();
  std::uint32_t *r1 = r0 + quads, *r2 = r1 + quads, *r3 = r2 + quads;
  philox_counters(std::uint32_t(p / 4), quads, std::uint32_t(stream), std::uint32_t(offset),
                  std::uint32_t(offset >> 32), std::uint32_t(seed), std::uint32_t(seed >> 32), r0, r1, r2, r3);
#pragma omp simd
  for (int64_t q = 0; q < quads; ++q) {
    const math::NormalPair first = math::box_muller(r0[q], r1[q]), second = math::box_muller(r2[q], r3[q]);
    dst[4 * q] = first.a;
    dst[4 * q + 1] = first.b;
    dst[4 * q + 2] = second.a;
    dst[4 * q + 3] = second.b;
  }
}

// normals_row in the compute type T: straight into dst for float, through `drawn` for double.
template <typename T>
void draw_row(std::uint64_t seed, std::uint64_t offset, std::uint64_t stream, int64_t p, int64_t n,
              NormalScratch& scratch, float* drawn, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    normals_row(seed, offset, stream, p, n, scratch, dst);
  } else {
    normals_row(seed, offset, stream, p, n, scratch, drawn);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = T(drawn[i]);
  }
}

// gamma of n time values (in place allowed).
template <typename T>
void gamma_row(const T* tau, int64_t n, const T* table, int last, T* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = math::gamma_at(tau[i], table, last);
}

// tau(v) under one table, the reference's exact inverse of gamma: for each v the last segment k in [0, T - 1]
// with table[k] <= v (0 when none is), then the segment's inverse (math::time_on_segment).
//
// Many lookups use a direct index built per call: the segment at the start of each of kCellsPerSegment * T
// equal cells of [table[0], table[T]] (O(cells + T) to build). A value's cell gives a first segment, one step
// moves it on when the next knot is <= v, and a check of the segment's two knots confirms it; values that
// fail the check (their cell holds more than two knots, as near the top of the default table, where the
// variance saturates) take the binary search. A vectorised row costs four table reads per value instead of
// the binary search's log2 T + 2: 1.2 ns instead of 3.5 per value with AVX2 (one thread, default table,
// variances of photos). Fewer lookups than kIndexedLookups run the binary search, each step a vectorised loop
// over the row.
template <typename T>
class TimeLookup {
 public:
  static constexpr int kCellsPerSegment = 8;
  static constexpr int64_t kIndexedLookups = 16384;

  TimeLookup(const T* table, int last, int64_t lookups) : table_(table), last_(last) {
    const T span = table[last] - table[0];
    if (lookups < kIndexedLookups || !(span > T(0))) return;
    cells_ = kCellsPerSegment * last;
    first_ = table[0];
    scale_ = T(cells_) / span;
    start_.resize(size_t(cells_));
    int k = 0;
    for (int j = 0; j < cells_; ++j) {
      const T edge = first_ + T(j) / scale_;
      while (k < last - 1 && table[k + 1] <= edge) ++k;
      start_[size_t(j)] = k;
    }
  }

  // out[i] = tau(v[i]) for a row of n values; segment: scratch of n ints.
  void row(const T* v, int64_t n, int* segment, T* out) const {
    if (cells_ == 0) {
      binary_search(v, n, segment);
      segments_to_times(v, n, segment, out);
      return;
    }
    // in separate loops: GCC does not vectorise a table read whose index comes from a comparison's select
    const int* start = start_.data();
    const T first = first_, scale = scale_, top_cell = T(cells_ - 1);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) segment[i] = start[int(math::clamp((v[i] - first) * scale, T(0), top_cell))];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) segment[i] = math::search_step(segment[i], 1, v[i], table_, last_);
    if (segments_to_times(v, n, segment, out)) {
      for (int64_t i = 0; i < n; ++i) {
        if (!right_segment(v[i], segment[i])) {
          binary_search(v + i, 1, segment + i);
          out[i] = math::time_on_segment(v[i], segment[i], table_, last_);
        }
      }
    }
  }

 private:
  bool right_segment(T v, int k) const {
    return (table_[k] <= v || k == 0) && (table_[k + 1] > v || k == last_ - 1);
  }

  void binary_search(const T* v, int64_t n, int* segment) const {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) segment[i] = 0;
    for (int step = math::search_top(last_); step > 0; step >>= 1) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) segment[i] = math::search_step(segment[i], step, v[i], table_, last_);
    }
  }

  // The times on the given segments; whether any segment is not v's (only the index's first guesses can be).
  bool segments_to_times(const T* v, int64_t n, const int* segment, T* out) const {
    const T* table = table_;
    const int last = last_;
    int wrong = 0;
#pragma omp simd reduction(| : wrong)
    for (int64_t i = 0; i < n; ++i) {
      const int k = segment[i];
      const T x = v[i], lo = table[k], hi = table[k + 1];
      out[i] = math::clamp(T(k) + (x - lo) / (hi - lo), T(0), T(last));
      wrong |= ((lo <= x) | (k == 0)) & ((hi > x) | (k == last - 1)) ? 0 : 1;
    }
    return wrong != 0;
  }

  const T* table_;
  int last_;
  int cells_ = 0;
  T first_ = 0, scale_ = 0;
  Buffer<int> start_;
};

}  // namespace
}  // namespace SVNR_CPU_NAMESPACE
}  // namespace svnr
