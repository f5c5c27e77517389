// Fused GroupNorm + spatial FiLM + SiLU on CUDA (DESIGN.md §1.6), forward and backward. Depends only on the
// CUDA runtime; tensors arrive as raw pointers with torch's current stream (GroupNormFilmArgs).
//
// One block per (image, group), the UNet case: NCHW, float32/bfloat16/float16, planes of whole 16-byte
// packs, groups of at most 128 KB, and at least as many (image, group) pairs as SMs.
//   forward   forward_group_nchw, 1 launch, 512 threads, 2 blocks/SM: pass 1 reads the group for its
//             statistics, pass 2 reads it again from L2 and applies GroupNorm, FiLM and SiLU, finding each
//             pixel's knot once for the group's channels; the FiLM per (channel, knot) is one float4 in
//             shared memory (fill_film_segments)
//   backward  3 launches: knot_records sorts each chunk of 8192 pixels by knot (a stable counting sort,
//             per image, shared by all groups); backward_group_nchw (256 threads, 1 block/SM: a 128 KB
//             tile) reads h and grad_out once per slice of two channels (its FiLM segments folded with the
//             GroupNorm affine and exp2's base, fill_backward_segments), writes grad_h's first term in float
//             (to grad_h for float32, else to the workspace: grad_h is rounded once), keeps
//             (d pre, d pre * (h - mean)) per pixel in the tile, and sums them in knot order along runs of
//             one knot in registers: the table-gradient histogram without atomics (no two threads ever add
//             to one knot at once, see add_first_runs); a last pass adds grad_h's group-mean terms, reading
//             h and the first term back from L2; finalize_group_backward sums the per-image partials of grad_table,
//             grad_weight and grad_bias in a fixed order (the backward is deterministic)
// Otherwise (channels_last, larger groups, small batches, float64, unaligned tensors), chunked kernels: 3
// launches (NCHW: 4, after a copy of the table transposed into the workspace, so that a channel's column is
// contiguous):
//   stats     per (image, channel, chunk of pixels): count, mean, M2 from shifted sums (x - first value)
//   finalize  one warp per (image, group): Chan-merge the chunks in double -> mean, rstd (saved outputs)
//   apply     per element: lerp the table at u, GroupNorm, FiLM, SiLU; the table (K, 2C) is read through L1
// Backward, 3 launches (NCHW: 4, with the transposed table; grad_table zero-filled by the caller):
//   reduce    per (image, channel, chunk): sums of dn and dn * xhat; the table gradient runs through
//             per-thread run-length sums (neighbouring pixels mostly share a segment), then a per-block
//             shared-memory histogram over the K rows (NCHW), flushed with one global atomic per touched
//             row, or straight to global atomics (NHWC, where a warp's 32 lanes hit 32 adjacent columns)
//   finalize  one warp per (image, group): the group means of dxhat and dxhat * xhat; one warp per
//             channel: grad_weight, grad_bias (deterministic: fixed-order sums, no atomics)
//   apply     per element: grad_h = rstd * (dn * w - mean(dxhat) - xhat * mean(dxhat * xhat))
// NCHW blocks cover a chunk of one (image, channel) plane, so per-channel values are block constants;
// NHWC kernels run channels innermost (coalesced rows of the table, weight and bias).
// Without FiLM (svnr::groupnorm_silu: K = 0, GroupNormFilmArgs.film false) every kernel is the same template
// with WithFilm = false: no u, no table (nothing transposed), no knot records (knot_records is not launched),
// no table gradient; the forward launches 1 (one block per group) or 3 kernels, the backward 2 or 3.
// backward_group_nchw then sums dn and dn * (h - mean) per thread and over the block (no tile, no sorted
// pass: its shared memory is the per-channel values only).
//
// Bytes moved per element, s = bytes per stored element (4 float32, 2 bf16/fp16): forward minimal 2s (read h,
// write out), backward 3s (read grad_out and h, write grad_h). The one-block-per-group kernels move these from
// DRAM when their second reads hit L2 (the forward's 2 blocks per SM keep at most 264 groups, 34 MB in
// float32, in flight; the backward's 1 block per SM 132 groups of h and grad_h, 34 MB; H100 and H200 have 50
// MB of L2); they request 3s and 6s (bf16/fp16 backward: 4s + 8, the first term in float). The chunked kernels read h (and grad_out) twice: 3s and 5s from DRAM,
// less what the apply pass finds in L2 (it visits the planes in reverse).
// Static roofline (benchmarks/roofline.py, sm_90, H200 model: 132 SMs x 4 issues x 1.98 GHz, 4248 GB/s copy
// bandwidth), 8x64x128x128 (8.4M elements), SiLU:
//   forward   float32 31.4 instructions/element, issue 7.9 us vs DRAM 16.0 us (0.49); bfloat16 28.7, 7.2 us vs
//             8.1 us (0.89); 64 registers at most, 2 blocks/SM
//   backward  float32 41.6 instructions/element, issue 10.4 us vs DRAM 23.9 us (0.44); bfloat16 43.2, 10.8 us
//             vs 12.0 us (0.90); 128 registers at most, 1 block/SM; no spills
// H100 (3.0 TB/s assumed): DRAM times x 1.42. 8x128x64x64 has half the elements, 8x256x32x32 a quarter; both
// have B * G = 256 (image, group) blocks (benchmarks/results/roofline-sm90.md has every shape).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "svnr_kernels.h"
#include "svnr_math.h"

namespace svnr {
namespace {

using std::int64_t;

constexpr int kThreads = 256;           // NCHW and flat NHWC kernels
constexpr int64_t kChunkElems = 4096;   // NCHW: elements of a plane per block
constexpr int kRows = 8;                // NHWC 2-D blocks: 32 channels x kRows pixel rows
constexpr int64_t kPixelChunk = 256;    // NHWC: pixels per block
// One block per (image, group): forward_group_nchw and backward_group_nchw
constexpr int kGroupThreads = 512;                  // forward: two blocks fill an SM's 2048 threads at 64 registers
constexpr int64_t kGroupMaxBytes = 128 * 1024;      // a group's bytes of h, read twice (the second time from L2)
constexpr int64_t kGroupFilmBytes = 40 * 1024;      // forward: its FiLM segments in shared memory
constexpr int kBackThreads = 256;                   // backward: at most; one block per SM (kBackChunk's tile)
constexpr int kBackChunk = 8192;                    // backward: pixels sorted together
constexpr int kKnotBits = 15;                       // sorted keys: the segment in the low 15 bits, the tile byte
constexpr unsigned kKnotMask = (1u << kKnotBits) - 1;   // offset (16 * pixel < 2^17) above: one shift-add to address
static_assert(int64_t(kBackChunk) * 16 <= (int64_t(1) << (32 - kKnotBits)), "a chunk's tile offsets fit a key");
constexpr int kSliceChannels = 2;                   // backward: channels of a group processed together
constexpr int kMinRun = 16;                         // backward: sorted positions per thread at least, where possible
constexpr int kSortThreads = 1024;                  // knot_records, at most
constexpr unsigned kFullMask = 0xFFFFFFFFu;

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("groupnorm_film (CUDA): ") + what + " failed: " +
                             cudaGetErrorName(status) + ": " + cudaGetErrorString(status));
}

void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename S>
using Compute = std::conditional_t<std::is_same_v<S, double>, double, float>;

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ double load(double x) { return x; }
__device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float load(__half x) { return __half2float(x); }

__device__ __forceinline__ void store(float& dst, float x) { dst = x; }
__device__ __forceinline__ void store(double& dst, double x) { dst = x; }
__device__ __forceinline__ void store(__nv_bfloat16& dst, float x) { dst = __float2bfloat16(x); }
__device__ __forceinline__ void store(__half& dst, float x) { dst = __float2half(x); }

// VEC consecutive stored elements, loaded and stored as one (up to 16-byte) transaction.
template <typename S, int VEC>
struct alignas(sizeof(S) * VEC) Pack {
  S v[VEC];
};

// VEC consecutive values of a compute-dtype array (u), in loads of up to 16 bytes: `src` is aligned to
// min(VEC * sizeof(T), 16) bytes.
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* src) {
  constexpr int kPart = VEC * sizeof(T) < 16 ? VEC : int(16 / sizeof(T));
  Pack<T, VEC> values;
#pragma unroll
  for (int i = 0; i < VEC; i += kPart) {
    const Pack<T, kPart> part = *reinterpret_cast<const Pack<T, kPart>*>(src + i);
#pragma unroll
    for (int j = 0; j < kPart; ++j) values.v[i + j] = part.v[j];
  }
  return values;
}

// The VEC elements of the 16 bytes at src (aligned) as floats, read as four 32-bit words: a bfloat16 is the
// high half of a float, so each unpacks with one instruction (a shift or a mask).
template <typename S, int VEC>
__device__ __forceinline__ Pack<float, VEC> load_floats(const S* src) {
  static_assert(sizeof(S) * VEC == 16, "16-byte packs");
  const uint4 w = *reinterpret_cast<const uint4*>(src);
  const unsigned words[4] = {w.x, w.y, w.z, w.w};
  Pack<float, VEC> out;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (std::is_same_v<S, float>) {
      out.v[j] = __uint_as_float(words[j]);
    } else if constexpr (std::is_same_v<S, __nv_bfloat16>) {
      out.v[2 * j] = __uint_as_float(words[j] << 16);
      out.v[2 * j + 1] = __uint_as_float(words[j] & 0xFFFF0000u);
    } else {
      out.v[2 * j] = __half2float(__ushort_as_half((unsigned short)(words[j] & 0xFFFFu)));
      out.v[2 * j + 1] = __half2float(__ushort_as_half((unsigned short)(words[j] >> 16)));
    }
  }
  return out;
}

// A 16-byte pack stored with one 16-byte access (st.global.v4): where a pack is filled amid other work,
// nvcc may split the struct copy into element stores.
template <typename S, int VEC>
__device__ __forceinline__ void store_pack(S* dst, const Pack<S, VEC>& values) {
  static_assert(sizeof(Pack<S, VEC>) == 16, "16-byte packs");
  unsigned words[4];
  memcpy(words, &values, 16);
#if defined(__CUDA_ARCH__)
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(words[0]), "r"(words[1]), "r"(words[2]),
               "r"(words[3])
               : "memory");
#else
  memcpy(dst, words, 16);
#endif
}

// p, opaque to the optimiser: in loops over 32-bit offsets, nvcc otherwise re-derives each address from the
// 64-bit parts of its base (image, group, plane) instead of one wide multiply-add of the offset onto it.
template <typename T>
__device__ __forceinline__ T* opaque(T* p) {
#if defined(__CUDA_ARCH__)
  asm("" : "+l"(p));
#endif
  return p;
}

// VEC floats stored as 16-byte packs (store_pack).
template <int VEC>
__device__ __forceinline__ void store_packs(float* dst, const Pack<float, VEC>& values) {
  static_assert(VEC % 4 == 0, "whole 16-byte packs");
#pragma unroll
  for (int i = 0; i < VEC; i += 4) {
    Pack<float, 4> part;
#pragma unroll
    for (int j = 0; j < 4; ++j) part.v[j] = values.v[i + j];
    store_pack(dst + i, part);
  }
}

template <typename T>
struct StatsPartial {   // one (image, channel, chunk): count, mean, M2
  T count, mean, m2;
};

template <typename T>
struct GradPartial {    // one (image, channel, chunk): sums of dn and dn * xhat
  T dn, dn_xhat;
};

// Which chunk of which plane (NCHW) or which 32 channels x pixel chunk (NHWC) the blocks cover.
struct Geometry {
  int64_t chunks;       // per (image, channel)
  int64_t chunk_elems;  // NCHW only
};

Geometry geometry(const GroupNormFilmArgs& args) {
  if (args.channels_last) return {ceil_div(args.pixels, kPixelChunk), 0};
  const int64_t chunk = std::min(kChunkElems, args.pixels);
  return {ceil_div(args.pixels, chunk), chunk};
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sums of v[0..N) over the block (a multiple of 32 threads, 1-D or 2-D); the results are valid in thread 0.
// Two calls need a __syncthreads between them (warp 0 may still read the partials the next call overwrites).
template <typename T, int N>
__device__ void block_sums(T (&v)[N]) {
  __shared__ T partial[N][32];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5, warps = (blockDim.x * blockDim.y) >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    v[i] = warp_sum(v[i]);
    if (lane == 0) partial[i][warp] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < warps ? partial[i][lane] : T(0));
  }
}

template <typename T>
__device__ void block_sum2(T& a, T& b) {
  T v[2] = {a, b};
  block_sums(v);
  a = v[0];
  b = v[1];
}

// ---------------------------------------------------------------------------------------------------
// Statistics and their finalisation
// ---------------------------------------------------------------------------------------------------

template <typename S, int VEC>
__global__ void stats_nchw(const S* __restrict__ h, int64_t pixels, int64_t chunks, int64_t chunk_elems,
                           StatsPartial<Compute<S>>* __restrict__ partial) {
  using T = Compute<S>;
  const int64_t plane = blockIdx.x / chunks, begin = (blockIdx.x % chunks) * chunk_elems;
  const int64_t end = min64(pixels, begin + chunk_elems);
  const S* x = h + plane * pixels;
  const T shift = load(x[begin]);
  T sum = 0, sum_sq = 0;
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += int64_t(blockDim.x) * VEC) {
    const Pack<S, VEC> pack = *reinterpret_cast<const Pack<S, VEC>*>(x + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const T d = load(pack.v[j]) - shift;
      sum += d;
      sum_sq += d * d;
    }
  }
  block_sum2(sum, sum_sq);
  if (threadIdx.x == 0) {
    const math::Moments<T> m = math::moments_from_shifted_sums(T(end - begin), shift, sum, sum_sq);
    partial[blockIdx.x] = {m.count, m.mean, m.m2};
  }
}

// Block (32, kRows), grid (chunks, ceil(C / 32), B).
template <typename S>
__global__ void stats_nhwc(const S* __restrict__ h, int64_t channels, int64_t pixels, int64_t chunks,
                           StatsPartial<Compute<S>>* __restrict__ partial) {
  using T = Compute<S>;
  __shared__ T shared_sum[kRows][33], shared_sq[kRows][33];
  const int64_t c = int64_t(blockIdx.y) * 32 + threadIdx.x, b = blockIdx.z;
  const int64_t begin = blockIdx.x * kPixelChunk, end = min64(pixels, begin + kPixelChunk);
  const S* image = h + b * pixels * channels;
  T shift = 0, sum = 0, sum_sq = 0;
  if (c < channels) {
    shift = load(image[begin * channels + c]);
    for (int64_t p = begin + threadIdx.y; p < end; p += kRows) {
      const T d = load(image[p * channels + c]) - shift;
      sum += d;
      sum_sq += d * d;
    }
  }
  shared_sum[threadIdx.y][threadIdx.x] = sum;
  shared_sq[threadIdx.y][threadIdx.x] = sum_sq;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int row = 1; row < kRows; ++row) {
      sum += shared_sum[row][threadIdx.x];
      sum_sq += shared_sq[row][threadIdx.x];
    }
    const math::Moments<T> m = math::moments_from_shifted_sums(T(end - begin), shift, sum, sum_sq);
    partial[(b * channels + c) * chunks + blockIdx.x] = {m.count, m.mean, m.m2};
  }
}

// One warp per (image, group): its partials are contiguous, (channel in group, chunk).
template <typename T>
__global__ void finalize_stats(const StatsPartial<T>* __restrict__ partial, int64_t groups_total,
                               int64_t per_group, double eps, T* __restrict__ mean, T* __restrict__ rstd) {
  const int64_t group = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  if (group >= groups_total) return;   // whole warps exit together
  math::Moments<double> m{0, 0, 0};
  for (int64_t i = lane; i < per_group; i += 32) {
    const StatsPartial<T> p = partial[group * per_group + i];
    m = math::merge(m, math::Moments<double>{double(p.count), double(p.mean), double(p.m2)});
  }
  for (int offset = 16; offset > 0; offset >>= 1) {
    const math::Moments<double> other{__shfl_xor_sync(kFullMask, m.count, offset),
                                      __shfl_xor_sync(kFullMask, m.mean, offset),
                                      __shfl_xor_sync(kFullMask, m.m2, offset)};
    m = math::merge(m, other);
  }
  if (lane == 0) {
    mean[group] = T(m.mean);
    rstd[group] = T(math::inverse_std(m.m2, m.count, eps));
  }
}

// The (K, 2C) table as (2C, K) columns, for the NCHW kernels that lerp one channel at many knots.
template <typename T>
__global__ void transpose_table(const T* __restrict__ table, int64_t knots, int64_t width, T* __restrict__ columns) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < knots * width;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t column = i / knots, k = i - column * knots;
    columns[i] = table[k * width + column];
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward apply
// ---------------------------------------------------------------------------------------------------

// The NCHW apply passes visit the planes in the reverse of the order the stats / reduce pass read them:
// its last blocks are the likeliest to be still in L2, so tensors larger than L2 get part of the second
// read from it instead of evicting everything just before it is needed.
__device__ __forceinline__ int64_t reversed_block() { return int64_t(gridDim.x) - 1 - blockIdx.x; }

template <typename S>
struct Params {   // what the apply and reduce kernels share
  using T = Compute<S>;
  const S* __restrict__ h;
  const S* __restrict__ grad_out;     // backward only
  const T* __restrict__ u;            // (B, HW)
  const T* __restrict__ table;        // (K, 2C) rows
  const T* __restrict__ columns;      // NCHW: the table transposed, (2C, K) (transpose_table's copy)
  const T* __restrict__ weight;
  const T* __restrict__ bias;
  const T* __restrict__ mean;         // (B, G)
  const T* __restrict__ rstd;
  const T* __restrict__ grad_coef;    // backward: (B, G, 2) group means of dxhat and dxhat * xhat
  S* __restrict__ result;             // out or grad_h
  T* __restrict__ mean_out;           // forward_group_nchw writes the statistics it computes
  T* __restrict__ rstd_out;
  int64_t channels, pixels, groups, per_group;
  int knots;
};

template <typename S, int VEC, bool Silu, bool WithFilm>
__global__ void forward_apply_nchw(Params<S> p, int64_t chunks, int64_t chunk_elems) {
  using T = Compute<S>;
  const int64_t block = reversed_block();
  const int64_t plane = block / chunks, begin = (block % chunks) * chunk_elems;
  const int64_t end = min64(p.pixels, begin + chunk_elems);
  const int64_t b = plane / p.channels, c = plane % p.channels, g = c / p.per_group;
  const T mu = p.mean[b * p.groups + g], rs = p.rstd[b * p.groups + g], w = p.weight[c], bias = p.bias[c];
  const T* scale_column = p.columns + c * p.knots;
  const T* shift_column = p.columns + (p.channels + c) * p.knots;
  const T* u = p.u + b * p.pixels;
  const S* x = p.h + plane * p.pixels;
  S* y = p.result + plane * p.pixels;
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += int64_t(blockDim.x) * VEC) {
    const Pack<S, VEC> in = *reinterpret_cast<const Pack<S, VEC>*>(x + i);
    Pack<T, VEC> us{};
    if constexpr (WithFilm) us = load_pack<VEC>(u + i);
    Pack<S, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      math::ScaleShift<T> scale_shift{T(0), T(0)};
      if constexpr (WithFilm) scale_shift = math::film_at(scale_column, shift_column, 1, math::knot(us.v[j], p.knots));
      const T n = math::normalize(load(in.v[j]), mu, rs) * w + bias;
      store(out.v[j], math::activate<Silu>(WithFilm ? math::film(n, scale_shift.scale, scale_shift.shift) : n));
    }
    *reinterpret_cast<Pack<S, VEC>*>(y + i) = out;
  }
}

// Flat over NHWC elements, VEC channels of one pixel per step (C % VEC == 0).
template <typename S, int VEC, bool Silu, bool WithFilm>
__global__ void forward_apply_nhwc(Params<S> p, int64_t packs) {
  using T = Compute<S>;
  const int64_t C = p.channels;
  for (int64_t pack = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; pack < packs;
       pack += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = pack * VEC, c0 = e % C, pixel = e / C, b = pixel / p.pixels;
    math::Knot<T> knot{};
    if constexpr (WithFilm) knot = math::knot(p.u[pixel], p.knots);
    const Pack<S, VEC> in = *reinterpret_cast<const Pack<S, VEC>*>(p.h + e);
    Pack<S, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = c0 + j, stat = b * p.groups + c / p.per_group;
      math::ScaleShift<T> scale_shift{T(0), T(0)};
      if constexpr (WithFilm) scale_shift = math::film_at(p.table + c, p.table + C + c, 2 * C, knot);
      const T n = math::normalize(load(in.v[j]), p.mean[stat], p.rstd[stat]) * p.weight[c] + p.bias[c];
      store(out.v[j], math::activate<Silu>(WithFilm ? math::film(n, scale_shift.scale, scale_shift.shift) : n));
    }
    *reinterpret_cast<Pack<S, VEC>*>(p.result + e) = out;
  }
}

// ---------------------------------------------------------------------------------------------------
// One block per (image, group), float compute: the per-element pieces
// ---------------------------------------------------------------------------------------------------

// u in knot units -> segment k and frac: u clamped to [0, K-1] (min/max: a NaN u lands on segment 0 instead
// of an index out of range), k = floor(u), frac = u - k. Unlike math::knot, u = K-1 takes segment K-1
// (frac 0), which fill_film_segments adds: the last knot's values with zero slopes, the same result as
// segment K-2 at frac 1 and no min() per pixel.
__device__ __forceinline__ void knot_of(float u, int knots, int& k, float& frac) {
  u = fminf(fmaxf(u, 0.0f), float(knots - 1));
  k = int(u);                          // u >= 0: truncation is floor
  frac = u - float(k);
}

// The FiLM of one channel on segment k as one float4, so that an element reads it in one 16-byte access and
// lerps it with two FMAs: scale = x + frac * y, shift = z + frac * w, with (x, y, z, w) = (1 + scale_k,
// scale_k+1 - scale_k, shift_k, shift_k+1 - shift_k), and slopes 0 on segment K-1. Written for channels
// [first, first + count) of the (K, 2C) table, (count, K) segments, by the block's threads.
__device__ void fill_film_segments(float4* segments, const float* __restrict__ table, int64_t first, int count,
                                   int64_t channels, int knots) {
#pragma unroll 1
  for (int c = 0; c < count; ++c) {
#pragma unroll 1
    for (int k = threadIdx.x; k < knots; k += blockDim.x) {
      const float* low = table + int64_t(k) * 2 * channels + first + c;
      const float scale = low[0], shift = low[channels];
      const bool last = k == knots - 1;
      segments[c * knots + k] = make_float4(1.0f + scale, last ? 0.0f : low[2 * channels] - scale, shift,
                                            last ? 0.0f : low[3 * channels] - shift);
    }
  }
}

__device__ __forceinline__ float film_pre(float n, float4 segment, float frac) {
  return n * fmaf(frac, segment.y, segment.x) + fmaf(frac, segment.w, segment.z);
}

// SiLU and its derivative s (1 + x (1 - s)), s = sigmoid(x), with the GPU's exp and division (MUFU ex2 and
// rcp under --use_fast_math: a few ulp, well inside the float32 tolerance); identity when not Silu.
template <bool Silu>
__device__ __forceinline__ float activate_fast(float x) {
  return Silu ? __fdividef(x, 1.0f + __expf(-x)) : x;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// The backward's FiLM per (channel, segment), folded with the channel's GroupNorm affine (rstd * weight,
// bias) and exp2's base: with (x, y, z, w) as in fill_film_segments, (a x, a y, -log2(e) (bias x + z),
// -log2(e) (bias y + w)) for a = -log2(e) rstd weight, so that for d = h - mean one FMA of the lerped pair
// gives z2 = -log2(e) * pre, exp2's argument for sigmoid(pre), and (d pre) times the lerped first value is
// grad_h's first term (scaled_activate_grad). Laid out per slice of kSliceChannels channels, the slice's
// channels side by side per segment, so that one address serves a pixel's slice: (c / 2, k, c % 2); an odd
// count's last slice repeats its channel.
__device__ void fill_backward_segments(float4* segments, const float* __restrict__ table,
                                       const float* __restrict__ weight, const float* __restrict__ bias, float rs,
                                       int64_t first, int count, int64_t channels, int knots) {
  static_assert(kSliceChannels == 2, "two channels per segment slot");
  const int width = int(2 * channels);
  const float* channel_weight = opaque(weight + first);
  const float* channel_bias = opaque(bias + first);
#pragma unroll 1
  for (int k = threadIdx.x; k < knots; k += blockDim.x) {
    const bool last = k == knots - 1;
    const float* scales = opaque(table + int64_t(k) * width + first);   // row k's scale columns, then row k + 1's
    const float* shifts = opaque(scales + channels);
    const float* next_scales = opaque(scales + (last ? 0 : width));
    const float* next_shifts = opaque(shifts + (last ? 0 : width));
    float4* slots = segments + 2 * k;
#pragma unroll 1
    for (int c = 0; c < count; ++c) {
      const float a = -kLog2e * rs * channel_weight[c], b = -kLog2e * channel_bias[c];
      const float scale = 1.0f + scales[c], shift = -kLog2e * shifts[c];
      const float scale_slope = next_scales[c] - scales[c];
      const float shift_slope = -kLog2e * (next_shifts[c] - shifts[c]);
      const float4 segment = make_float4(a * scale, a * scale_slope, fmaf(b, scale, shift),
                                         fmaf(b, scale_slope, shift_slope));
      float4* slot = slots + 2 * (c >> 1) * knots;
      slot[c & 1] = segment;
      if (c == count - 1 && (c & 1) == 0) slot[1] = segment;
    }
  }
}

// -ln(2) times the activation's derivative at pre, from z2 = -log2(e) * pre (fill_backward_segments): with
// e = exp(-pre) and s = ln(2) sigmoid(pre) = 1 / ((1 + e) log2(e)), s (z2 e s - 1) = -ln(2) sigmoid(pre)
// (1 + pre (1 - sigmoid(pre))); the GPU's exp2 and reciprocal (MUFU ex2, rcp). The factor -ln(2) cancels
// against the segments' -log2(e) in grad_h's first term and is divided out of the kept sums at the end.
template <bool Silu>
__device__ __forceinline__ float scaled_activate_grad(float z2) {
  if (!Silu) return -kLn2;
  const float e = exp2f(z2), s = __fdividef(1.0f, fmaf(e, kLog2e, kLog2e));
  return s * fmaf(z2, e * s, -1.0f);
}

// NCHW groups of at most kGroupMaxBytes, with at least as many (image, group) pairs as SMs: one block per
// (image, group), in one launch. Pass 1 reads the group (its cpg planes are contiguous) for the statistics;
// pass 2 reads it again, from L2 (the block read it microseconds before; two blocks per SM keep at most
// 264 groups, 34 MB, in flight), and applies GroupNorm, FiLM and the activation. Pass 2 walks the pixels
// and, per pixel, the group's channels, so that a knot is found once per pixel, not per element.
// Grid (groups, images). Dynamic shared memory: the group's FiLM segments (fill_film_segments), then
// (rstd * weight, bias) per channel.
template <typename S, int VEC, bool Silu, bool WithFilm>
__global__ void __launch_bounds__(kGroupThreads, 2) forward_group_nchw(Params<S> p, double eps) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ float2 shared_stat;   // mean, rstd
  const int per_group = int(p.per_group), pixels = int(p.pixels), segments = p.knots;
  float4* film = reinterpret_cast<float4*>(shared_raw);
  float2* channel = reinterpret_cast<float2*>(film + per_group * segments);
  const int64_t b = blockIdx.y, group = b * p.groups + blockIdx.x, first_channel = int64_t(blockIdx.x) * per_group;
  const int count = per_group * pixels, packs = count / VEC;
  const S* x = p.h + group * count;
  S* y = p.result + group * count;
  if constexpr (WithFilm)   // published by the barriers below
    fill_film_segments(film, p.table, first_channel, per_group, p.channels, p.knots);

  // Statistics without cancellation: each thread sums d = x - (its first element) and d^2; the block merges
  // the threads' means and M2 (M2 = sum of the threads' M2 + n (thread mean - mean)^2, all terms >= 0).
  const float shift = threadIdx.x < packs ? load(x[threadIdx.x * VEC]) : 0.0f;
  float sum = 0, sum_sq = 0;
  int n = 0;
  const S* in_pack = x + threadIdx.x * VEC;
#pragma unroll 1
  for (int pack = threadIdx.x; pack < packs; pack += blockDim.x, in_pack += blockDim.x * VEC) {
    const Pack<float, VEC> in = load_floats<S, VEC>(in_pack);
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float d = in.v[v] - shift;
      sum += d;
      sum_sq += d * d;
    }
    n += VEC;
  }
  float total[1] = {float(n) * shift + sum};
  block_sums(total);
  if (threadIdx.x == 0) shared_stat.x = total[0] / float(count);
  __syncthreads();
  const float mu = shared_stat.x;
  const float thread_mean = n > 0 ? shift + sum / float(n) : mu;
  float m2[1] = {n > 0 ? (sum_sq - sum * (thread_mean - shift)) + float(n) * (thread_mean - mu) * (thread_mean - mu)
                       : 0.0f};
  block_sums(m2);
  if (threadIdx.x == 0) {
    const float rs = math::inverse_std(m2[0], float(count), float(eps));
    shared_stat.y = rs;
    p.mean_out[group] = mu;
    p.rstd_out[group] = rs;
  }
  __syncthreads();
  const float rs = shared_stat.y;
  for (int c = threadIdx.x; c < per_group; c += blockDim.x)
    channel[c] = make_float2(rs * p.weight[first_channel + c], p.bias[first_channel + c]);
  __syncthreads();

  const float* u = p.u + b * pixels;
#pragma unroll 1
  for (int pixel = threadIdx.x * VEC; pixel < pixels; pixel += blockDim.x * VEC) {
    int k[VEC];
    float frac[VEC];
    if constexpr (WithFilm) {
      const Pack<float, VEC> us = load_pack<VEC>(u + pixel);
#pragma unroll
      for (int v = 0; v < VEC; ++v) knot_of(us.v[v], p.knots, k[v], frac[v]);
    }
    const Pack<S, VEC>* in = reinterpret_cast<const Pack<S, VEC>*>(x + pixel);
    Pack<S, VEC>* out = reinterpret_cast<Pack<S, VEC>*>(y + pixel);
    const float4* segment = film;
#pragma unroll 1
    for (int c = 0; c < per_group; ++c, in += pixels / VEC, out += pixels / VEC, segment += segments) {
      const float2 coef = channel[c];
      const Pack<float, VEC> h_pack = load_floats<S, VEC>(in->v);
      Pack<S, VEC> result;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float normalized = fmaf(h_pack.v[v] - mu, coef.x, coef.y);
        store(result.v[v], activate_fast<Silu>(WithFilm ? film_pre(normalized, segment[k[v]], frac[v]) : normalized));
      }
      *out = result;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward reduce
// ---------------------------------------------------------------------------------------------------

// The table gradient of consecutive pixels of one thread that share a segment k, summed before it is
// written: rows k (weight 1 - frac) and k + 1 (weight frac), columns scale and shift.
template <typename T>
struct SegmentRun {
  int k = -1;
  T scale_low = 0, scale_high = 0, shift_low = 0, shift_high = 0;

  template <typename Flush>
  __device__ void add(const math::Knot<T>& knot, T dscale, T dshift, Flush&& flush) {
    if (knot.k != k) {
      if (k >= 0) flush(*this);
      k = knot.k;
      scale_low = scale_high = shift_low = shift_high = T(0);
    }
    scale_low += dscale * (T(1) - knot.frac);
    scale_high += dscale * knot.frac;
    shift_low += dshift * (T(1) - knot.frac);
    shift_high += dshift * knot.frac;
  }
};

// Dynamic shared memory: the block's histogram of its channel's table gradient, 2K values.
template <typename S, int VEC, bool Silu, bool WithFilm>
__global__ void backward_reduce_nchw(Params<S> p, int64_t chunks, int64_t chunk_elems,
                                     GradPartial<Compute<S>>* __restrict__ partial,
                                     Compute<S>* __restrict__ grad_table) {
  using T = Compute<S>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* hist_scale = reinterpret_cast<T*>(shared_raw);
  T* hist_shift = hist_scale + p.knots;
  for (int i = threadIdx.x; i < 2 * p.knots; i += blockDim.x) hist_scale[i] = T(0);
  __syncthreads();

  const int64_t plane = blockIdx.x / chunks, begin = (blockIdx.x % chunks) * chunk_elems;
  const int64_t end = min64(p.pixels, begin + chunk_elems);
  const int64_t b = plane / p.channels, c = plane % p.channels, g = c / p.per_group;
  const T mu = p.mean[b * p.groups + g], rs = p.rstd[b * p.groups + g], w = p.weight[c], bias = p.bias[c];
  const T* scale_column = p.columns + c * p.knots;
  const T* shift_column = p.columns + (p.channels + c) * p.knots;
  const T* u = p.u + b * p.pixels;
  const S* x = p.h + plane * p.pixels;
  const S* dy = p.grad_out + plane * p.pixels;
  auto flush = [&](const SegmentRun<T>& run) {
    atomicAdd(hist_scale + run.k, run.scale_low);
    atomicAdd(hist_scale + run.k + 1, run.scale_high);
    atomicAdd(hist_shift + run.k, run.shift_low);
    atomicAdd(hist_shift + run.k + 1, run.shift_high);
  };
  SegmentRun<T> run;
  T sum_dn = 0, sum_dn_xhat = 0;
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += int64_t(blockDim.x) * VEC) {
    const Pack<S, VEC> xs = *reinterpret_cast<const Pack<S, VEC>*>(x + i);
    const Pack<S, VEC> dys = *reinterpret_cast<const Pack<S, VEC>*>(dy + i);
    Pack<T, VEC> us{};
    if constexpr (WithFilm) us = load_pack<VEC>(u + i);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const math::Knot<T> knot = WithFilm ? math::knot(us.v[j], p.knots) : math::Knot<T>{0, T(0)};
      math::ScaleShift<T> scale_shift{T(0), T(0)};
      if constexpr (WithFilm) scale_shift = math::film_at(scale_column, shift_column, 1, knot);
      const T xhat = math::normalize(load(xs.v[j]), mu, rs);
      const math::FilmGrad<T> grad = math::film_grad<Silu>(T(load(dys.v[j])), xhat, w, bias, scale_shift.scale, scale_shift.shift);
      sum_dn += grad.dn;
      sum_dn_xhat += grad.dn * xhat;
      if constexpr (WithFilm) run.add(knot, grad.dscale, grad.dpre, flush);
    }
  }
  if (run.k >= 0) flush(run);
  block_sum2(sum_dn, sum_dn_xhat);   // synchronises the block: the histogram is complete after it
  if (threadIdx.x == 0) partial[blockIdx.x] = {sum_dn, sum_dn_xhat};
  for (int k = threadIdx.x; k < p.knots; k += blockDim.x) {
    if (hist_scale[k] != T(0)) atomicAdd(grad_table + k * 2 * p.channels + c, hist_scale[k]);
    if (hist_shift[k] != T(0)) atomicAdd(grad_table + k * 2 * p.channels + p.channels + c, hist_shift[k]);
  }
}

// Block (32, kRows), grid (chunks, ceil(C / 32), B): each thread walks one channel over pixel rows.
template <typename S, bool Silu, bool WithFilm>
__global__ void backward_reduce_nhwc(Params<S> p, int64_t chunks, GradPartial<Compute<S>>* __restrict__ partial,
                                     Compute<S>* __restrict__ grad_table) {
  using T = Compute<S>;
  __shared__ T shared_dn[kRows][33], shared_dn_xhat[kRows][33];
  const int64_t C = p.channels, c = int64_t(blockIdx.y) * 32 + threadIdx.x, b = blockIdx.z;
  const int64_t begin = blockIdx.x * kPixelChunk, end = min64(p.pixels, begin + kPixelChunk);
  T sum_dn = 0, sum_dn_xhat = 0;
  if (c < C) {
    const int64_t stat = b * p.groups + c / p.per_group;
    const T mu = p.mean[stat], rs = p.rstd[stat], w = p.weight[c], bias = p.bias[c];
    auto flush = [&](const SegmentRun<T>& run) {
      T* row = grad_table + run.k * 2 * C;
      atomicAdd(row + c, run.scale_low);
      atomicAdd(row + 2 * C + c, run.scale_high);
      atomicAdd(row + C + c, run.shift_low);
      atomicAdd(row + 3 * C + c, run.shift_high);
    };
    SegmentRun<T> run;
    for (int64_t pixel = begin + threadIdx.y; pixel < end; pixel += kRows) {
      const int64_t e = (b * p.pixels + pixel) * C + c;
      math::Knot<T> knot{};
      math::ScaleShift<T> scale_shift{T(0), T(0)};
      if constexpr (WithFilm) {
        knot = math::knot(p.u[b * p.pixels + pixel], p.knots);
        scale_shift = math::film_at(p.table + c, p.table + C + c, 2 * C, knot);
      }
      const T xhat = math::normalize(load(p.h[e]), mu, rs);
      const math::FilmGrad<T> grad = math::film_grad<Silu>(T(load(p.grad_out[e])), xhat, w, bias, scale_shift.scale, scale_shift.shift);
      sum_dn += grad.dn;
      sum_dn_xhat += grad.dn * xhat;
      if constexpr (WithFilm) run.add(knot, grad.dscale, grad.dpre, flush);
    }
    if (run.k >= 0) flush(run);
  }
  shared_dn[threadIdx.y][threadIdx.x] = sum_dn;
  shared_dn_xhat[threadIdx.y][threadIdx.x] = sum_dn_xhat;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    for (int row = 1; row < kRows; ++row) {
      sum_dn += shared_dn[row][threadIdx.x];
      sum_dn_xhat += shared_dn_xhat[row][threadIdx.x];
    }
    partial[(b * C + c) * chunks + blockIdx.x] = {sum_dn, sum_dn_xhat};
  }
}

// Warps 0 .. B*G-1: the group means of dxhat = dn * w and dxhat * xhat (partials of a group contiguous);
// warps B*G .. B*G+C-1: grad_weight and grad_bias of one channel, summed over images and chunks.
template <typename T>
__global__ void finalize_backward(const GradPartial<T>* __restrict__ partial, const T* __restrict__ weight,
                                  int64_t batch, int64_t channels, int64_t groups, int64_t per_group,
                                  int64_t chunks, int64_t pixels, T* __restrict__ grad_coef,
                                  T* __restrict__ grad_weight, T* __restrict__ grad_bias) {
  const int64_t task = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x & 31;
  double a = 0, b = 0;
  if (task < batch * groups) {
    const int64_t count = per_group * chunks, g = task % groups;
    for (int64_t i = lane; i < count; i += 32) {
      const GradPartial<T> part = partial[task * count + i];
      const double w = weight[g * per_group + i / chunks];
      a += w * double(part.dn);
      b += w * double(part.dn_xhat);
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      const double n = double(per_group * pixels);
      grad_coef[2 * task] = T(a / n);
      grad_coef[2 * task + 1] = T(b / n);
    }
  } else if (task < batch * groups + channels) {
    const int64_t c = task - batch * groups;
    for (int64_t i = lane; i < batch * chunks; i += 32) {
      const GradPartial<T> part = partial[((i / chunks) * channels + c) * chunks + i % chunks];
      a += double(part.dn);
      b += double(part.dn_xhat);
    }
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      grad_bias[c] = T(a);
      grad_weight[c] = T(b);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward apply
// ---------------------------------------------------------------------------------------------------

template <typename S, int VEC, bool Silu, bool WithFilm>
__global__ void backward_apply_nchw(Params<S> p, int64_t chunks, int64_t chunk_elems) {
  using T = Compute<S>;
  const int64_t block = reversed_block();
  const int64_t plane = block / chunks, begin = (block % chunks) * chunk_elems;
  const int64_t end = min64(p.pixels, begin + chunk_elems);
  const int64_t b = plane / p.channels, c = plane % p.channels, stat = b * p.groups + c / p.per_group;
  const T mu = p.mean[stat], rs = p.rstd[stat], w = p.weight[c], bias = p.bias[c];
  const T mean_dxhat = p.grad_coef[2 * stat], mean_dxhat_xhat = p.grad_coef[2 * stat + 1];
  const T* scale_column = p.columns + c * p.knots;
  const T* shift_column = p.columns + (p.channels + c) * p.knots;
  const T* u = p.u + b * p.pixels;
  const S* x = p.h + plane * p.pixels;
  const S* dy = p.grad_out + plane * p.pixels;
  S* dx = p.result + plane * p.pixels;
  for (int64_t i = begin + threadIdx.x * VEC; i < end; i += int64_t(blockDim.x) * VEC) {
    const Pack<S, VEC> xs = *reinterpret_cast<const Pack<S, VEC>*>(x + i);
    const Pack<S, VEC> dys = *reinterpret_cast<const Pack<S, VEC>*>(dy + i);
    Pack<T, VEC> us{};
    if constexpr (WithFilm) us = load_pack<VEC>(u + i);
    Pack<S, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      math::ScaleShift<T> scale_shift{T(0), T(0)};
      if constexpr (WithFilm)
        scale_shift = math::film_at(scale_column, shift_column, 1, math::knot(us.v[j], p.knots));
      const T xhat = math::normalize(load(xs.v[j]), mu, rs);
      const math::FilmGrad<T> grad = math::film_grad<Silu>(T(load(dys.v[j])), xhat, w, bias, scale_shift.scale, scale_shift.shift);
      store(out.v[j], math::groupnorm_grad_input(grad.dn, w, xhat, rs, mean_dxhat, mean_dxhat_xhat));
    }
    *reinterpret_cast<Pack<S, VEC>*>(dx + i) = out;
  }
}

template <typename S, int VEC, bool Silu, bool WithFilm>
__global__ void backward_apply_nhwc(Params<S> p, int64_t packs) {
  using T = Compute<S>;
  const int64_t C = p.channels;
  for (int64_t pack = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; pack < packs;
       pack += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = pack * VEC, c0 = e % C, pixel = e / C, b = pixel / p.pixels;
    math::Knot<T> knot{};
    if constexpr (WithFilm) knot = math::knot(p.u[pixel], p.knots);
    const Pack<S, VEC> xs = *reinterpret_cast<const Pack<S, VEC>*>(p.h + e);
    const Pack<S, VEC> dys = *reinterpret_cast<const Pack<S, VEC>*>(p.grad_out + e);
    Pack<S, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = c0 + j, stat = b * p.groups + c / p.per_group;
      math::ScaleShift<T> scale_shift{T(0), T(0)};
      if constexpr (WithFilm) scale_shift = math::film_at(p.table + c, p.table + C + c, 2 * C, knot);
      const T rs = p.rstd[stat], w = p.weight[c];
      const T xhat = math::normalize(load(xs.v[j]), p.mean[stat], rs);
      const math::FilmGrad<T> grad = math::film_grad<Silu>(T(load(dys.v[j])), xhat, w, p.bias[c], scale_shift.scale, scale_shift.shift);
      store(out.v[j], math::groupnorm_grad_input(grad.dn, w, xhat, rs, p.grad_coef[2 * stat],
                                                 p.grad_coef[2 * stat + 1]));
    }
    *reinterpret_cast<Pack<S, VEC>*>(p.result + e) = out;
  }
}

// ---------------------------------------------------------------------------------------------------
// Backward, one block per (image, group): knot_records, backward_group_nchw, finalize_group_backward
// ---------------------------------------------------------------------------------------------------

// The knots of an image's pixels, in pixel order and, per chunk of chunk_pixels pixels, sorted by segment.
struct KnotRecords {
  int* k;                    // (B, HW) segment of each pixel, times 16 (its byte offset in a channel's segments)
  float* frac;               // (B, HW)
  unsigned* sorted_key;      // (B, HW): per chunk, 16 * (pixel in the chunk) << kKnotBits | segment, in segment order
  float* sorted_frac;        // (B, HW)
};

// Grid (chunks, images), 32 * warps threads, dynamic shared memory (warps + 1) * K ints. A stable counting
// sort of the chunk's pixels by segment: each warp counts the segments of its part of the chunk (equal
// segments in a step of 32 pixels found with __match_any_sync, counted by the lowest such lane: no atomics),
// a prefix over (segment, warp) gives each warp its first slot per segment, and each warp writes its pixels
// in order, ranked within a step by lane. Pixels of one segment stay in pixel order: the backward's sums
// are deterministic.
__global__ void knot_records(const float* __restrict__ u, int pixels, int chunk_pixels, int knots, KnotRecords out) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int* slot = reinterpret_cast<int*>(shared_raw);   // (warps, K): counts, then the warp's next slot
  int* base = slot + warps * knots;                  // (K): first slot of each segment
  const int chunk_begin = blockIdx.x * chunk_pixels;
  const int chunk_len = chunk_pixels < pixels - chunk_begin ? chunk_pixels : pixels - chunk_begin;
  const int64_t offset = int64_t(blockIdx.y) * pixels + chunk_begin;
  const float* chunk_u = opaque(u + offset);
  int* chunk_k = opaque(out.k + offset);
  float* chunk_frac = opaque(out.frac + offset);
  unsigned* chunk_sorted_key = opaque(out.sorted_key + offset);
  float* chunk_sorted_frac = opaque(out.sorted_frac + offset);
  for (int i = threadIdx.x; i < warps * knots; i += blockDim.x) slot[i] = 0;
  __syncthreads();
  const int part = (chunk_len + warps - 1) / warps;
  const int part_begin = warp * part < chunk_len ? warp * part : chunk_len;
  const int part_end = part_begin + part < chunk_len ? part_begin + part : chunk_len;
  int* warp_slot = slot + warp * knots;
  const unsigned lower_lanes = (1u << lane) - 1;
  // warp-uniform steps of 32 pixels; lanes past the part hold no pixel (segment `knots`, never counted)
#pragma unroll 1
  for (int step = part_begin; step < part_end; step += 32) {
    const int pixel = step + lane;
    int k = knots;
    float frac = 0;
    if (pixel < part_end) {
      knot_of(chunk_u[pixel], knots, k, frac);
      chunk_k[pixel] = k * int(sizeof(float4));
      chunk_frac[pixel] = frac;
    }
    const unsigned peers = __match_any_sync(kFullMask, k);
    if (k < knots && (peers & lower_lanes) == 0) warp_slot[k] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();
  // slot[w][k] = pixels of warps before w in segment k; base[k] = pixels of the chunk in segment k
#pragma unroll 1
  for (int k = threadIdx.x; k < knots; k += blockDim.x) {
    int running = 0;
#pragma unroll 1
    for (int w = 0; w < warps; ++w) {
      const int count = slot[w * knots + k];
      slot[w * knots + k] = running;
      running += count;
    }
    base[k] = running;
  }
  __syncthreads();
  if (warp == 0) {   // base: exclusive prefix sum over the segments, 32 at a time
    int carry = 0;
#pragma unroll 1
    for (int k0 = 0; k0 < knots; k0 += 32) {
      const int own = k0 + lane < knots ? base[k0 + lane] : 0;
      int inclusive = own;
#pragma unroll
      for (int delta = 1; delta < 32; delta <<= 1) {
        const int before = __shfl_up_sync(kFullMask, inclusive, delta);
        if (lane >= delta) inclusive += before;
      }
      if (k0 + lane < knots) base[k0 + lane] = carry + inclusive - own;
      carry += __shfl_sync(kFullMask, inclusive, 31);
    }
  }
  __syncthreads();
#pragma unroll 1
  for (int step = part_begin; step < part_end; step += 32) {
    const int pixel = step + lane;
    const int k = pixel < part_end ? chunk_k[pixel] / int(sizeof(float4)) : knots;
    const unsigned peers = __match_any_sync(kFullMask, k);
    if (k < knots) {
      const int position = base[k] + warp_slot[k] + __popc(peers & lower_lanes);
      chunk_sorted_key[position] = unsigned(pixel) * unsigned(sizeof(float4)) << kKnotBits | unsigned(k);
      chunk_sorted_frac[position] = chunk_frac[pixel];
    }
    __syncwarp();   // every lane has read warp_slot[k] before its lowest lane advances it
    if (k < knots && (peers & lower_lanes) == 0) warp_slot[k] += __popc(peers);
    __syncwarp();
  }
}

// Sums of v over the runs of equal keys of a warp, where the keys do not decrease with the lane: after it,
// the first lane of each run holds the run's total (a segmented suffix scan: in the round with offset o a
// lane adds the partial o lanes up when that lane has its key, which then covers the lanes between).
template <int N>
__device__ __forceinline__ void run_totals(int key, float (&v)[N]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int other = __shfl_down_sync(kFullMask, key, offset);
    float add[N];
#pragma unroll
    for (int j = 0; j < N; ++j) add[j] = __shfl_down_sync(kFullMask, v[j], offset);
    if (lane + offset < 32 && other == key) {
#pragma unroll
      for (int j = 0; j < N; ++j) v[j] += add[j];
    }
  }
}

// hist[c][key] += v[4c .. 4c + 3] for the slice's channels c < channels.
template <int CS>
__device__ __forceinline__ void add_to_cell(float4* hist, int knots, int channels, int key, const float (&v)[4 * CS]) {
#pragma unroll
  for (int c = 0; c < CS; ++c) {
    if (c < channels) {
      float4 cell = hist[c * knots + key];
      cell.x += v[4 * c];
      cell.y += v[4 * c + 1];
      cell.z += v[4 * c + 2];
      cell.w += v[4 * c + 3];
      hist[c * knots + key] = cell;
    }
  }
}

// Adds one sorted position's (d pre, d scale) of two channels, weighted by 1 and frac, to the running sums
// (d scale, d scale * frac, d pre, d pre * frac) per channel.
__device__ __forceinline__ void accumulate_pair(float (&total)[8], float4 kept, float frac) {
  total[0] += kept.y;
  total[1] = fmaf(kept.y, frac, total[1]);
  total[2] += kept.x;
  total[3] = fmaf(kept.x, frac, total[3]);
  total[4] += kept.w;
  total[5] = fmaf(kept.w, frac, total[5]);
  total[6] += kept.z;
  total[7] = fmaf(kept.z, frac, total[7]);
}

__device__ __forceinline__ void subtract_pair(float (&total)[8], float4 kept, float frac) {
  total[0] -= kept.y;
  total[1] = fmaf(-kept.y, frac, total[1]);
  total[2] -= kept.x;
  total[3] = fmaf(-kept.x, frac, total[3]);
  total[4] -= kept.w;
  total[5] = fmaf(-kept.w, frac, total[5]);
  total[6] -= kept.z;
  total[7] = fmaf(-kept.z, frac, total[7]);
}

template <int CS>
struct alignas(16) RunSlot {
  float v[4 * CS];
  int key;
};

// The deferred first runs of the threads' sorted ranges, added to hist without two threads ever writing
// one cell at once. Keys do not decrease with the thread (no_key, above all, for threads without positions),
// so equal keys are runs of consecutive threads: each warp totals its runs (run_totals) and the first lane of
// a run inside the warp adds it; a run that touches lane 0 or lane 31 may continue into the neighbouring
// warp, so the warp's first and last runs go to slots, which warp 0 totals the same way and adds after a
// barrier. Why plain read-modify-writes suffice: a thread's own (phase-1) runs have keys above its first key
// and up to the next thread's first key, so they differ between threads; a run totalled inside a warp has a
// key strictly between the warp's first and last keys, so no other warp writes it before the barrier, and in
// this warp only the lane just before the run may have written it, in its phase 1, which the __syncwarp
// below orders before the total is added.
template <int CS>
__device__ void add_first_runs(float4* hist, int knots, int channels, int key, float (&v)[4 * CS],
                               RunSlot<CS>* slots, int no_key) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncwarp();   // this warp's phase-1 writes are visible to the lanes that add below
  run_totals(key, v);
  const int before = __shfl_up_sync(kFullMask, key, 1);
  const int first_key = __shfl_sync(kFullMask, key, 0), last_key = __shfl_sync(kFullMask, key, 31);
  const bool head = lane == 0 || before != key;
  if (head && key != first_key && key != last_key) add_to_cell<CS>(hist, knots, channels, key, v);
  if (lane == 0) {
    RunSlot<CS>& slot = slots[2 * warp];
#pragma unroll
    for (int j = 0; j < 4 * CS; ++j) slot.v[j] = v[j];
    slot.key = key;
  }
  if (head && key == last_key) {   // lane 0 when the warp is one run: the total is in the first slot already
    RunSlot<CS>& slot = slots[2 * warp + 1];
    const bool whole_warp = lane == 0;
#pragma unroll
    for (int j = 0; j < 4 * CS; ++j) slot.v[j] = whole_warp ? 0.0f : v[j];
    slot.key = key;
  }
  __syncthreads();
  if (warp == 0) {
    const bool slot = lane < 2 * int(blockDim.x >> 5);
    int slot_key = slot ? slots[lane].key : no_key;
    float total[4 * CS];
#pragma unroll
    for (int j = 0; j < 4 * CS; ++j) total[j] = slot ? slots[lane].v[j] : 0.0f;
    run_totals(slot_key, total);
    const int slot_before = __shfl_up_sync(kFullMask, slot_key, 1);
    if ((lane == 0 || slot_before != slot_key) && slot_key != no_key)
      add_to_cell<CS>(hist, knots, channels, slot_key, total);
  }
}

// NCHW backward, one block per (image, group) (grid (groups, images)), as forward_group_nchw: the groups of
// at most kGroupMaxBytes when there are at least as many (image, group) pairs as SMs. For each slice of
// kSliceChannels channels and each chunk of the plane (knot_records' chunks):
//   natural order  read h and grad_out (coalesced), per element the FiLM and activation gradients; write
//                  grad_h's first term rstd * weight * dn (dn = d GroupNorm output) to grad_h, sum dn and
//                  dn * (h - mean) per channel, and keep (d pre, d scale) in a shared-memory tile;
//   sorted order   each thread takes a range of the chunk's pixels sorted by segment and sums the tile's
//                  values in registers along runs of one segment: the table gradient's histogram (sums of
//                  g and g * frac per segment, g = d scale, d shift) without atomics; a completed run goes
//                  to the block's histogram in shared memory (the thread's first run, which the previous
//                  thread may share, is deferred to add_first_runs).
// Then the group's means of dxhat and dxhat * xhat, the per-image partials of the weight, bias and table
// gradients (finalize_group_backward sums them over the images), and a pass over the group that adds the
// rest of grad_h, rstd * (-mean(dxhat) - xhat mean(dxhat xhat)), reading h and grad_h from L2.
// Dynamic shared memory: the group's FiLM segments (fill_backward_segments, channels rounded up to even) and
// histogram, (K) float4 per channel each; -log2(e) (rstd * weight, bias) and the channel sums per channel; the
// tile, one float4 per pixel of the chunk (d pre, d scale of the slice's two channels).
template <typename S, int VEC, bool Silu, bool WithFilm>
__global__ void __launch_bounds__(kBackThreads, 1) backward_group_nchw(Params<S> p, KnotRecords knots_of,
                                                                     int chunk_pixels, int per_thread,
                                                                     float* __restrict__ partial,
                                                                     float* first_terms) {
  constexpr int CS = kSliceChannels;
  static_assert(CS == 2, "the tile holds (d pre, d scale) of two channels per pixel: one float4");
  extern __shared__ __align__(16) unsigned char shared_raw[];
  __shared__ RunSlot<CS> slots[2 * (kBackThreads / 32)];
  __shared__ float2 correction;   // grad_h's second term is correction.x + h * correction.y
  const int per_group = int(p.per_group), pixels = int(p.pixels), knots = p.knots;
  float4* film = reinterpret_cast<float4*>(shared_raw);
  float4* hist = film + (per_group + 1) / 2 * 2 * knots;   // per (channel, segment): sums of d pre (h - mean),
                                                            // of that * frac, of d pre and of d pre * frac,
                                                            // times -ln(2) (scaled_activate_grad)
  float2* channel = reinterpret_cast<float2*>(hist + per_group * knots);   // -log2(e) (rstd * weight, bias)
  float2* channel_sums = channel + per_group;                              // sum dn, sum dn * (h - mean)
  float2* tile = channel_sums + per_group;
  const int64_t b = blockIdx.y, group = b * p.groups + blockIdx.x, first_channel = int64_t(blockIdx.x) * per_group;
  const int count = per_group * pixels;
  const S* x = p.h + group * count;
  const S* dy = p.grad_out + group * count;
  S* dx = p.result + group * count;
  // grad_h's first term between the passes, in float: grad_h itself for float32, else the workspace's copy (a
  // 16-bit first term would round grad_h twice)
  float* first = std::is_same_v<S, float> ? reinterpret_cast<float*>(dx) : first_terms + group * count;
  const float mu = p.mean[group], rs = p.rstd[group];
  if constexpr (WithFilm)
    fill_backward_segments(film, p.table, p.weight, p.bias, rs, first_channel, per_group, p.channels, knots);
  for (int i = threadIdx.x; i < per_group * knots; i += blockDim.x) hist[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int c = threadIdx.x; c < per_group; c += blockDim.x)
    channel[c] = make_float2(-kLog2e * rs * p.weight[first_channel + c], -kLog2e * p.bias[first_channel + c]);
  __syncthreads();
  const int64_t image_offset = b * pixels, width = 2 * p.channels;
  const int* image_k = opaque(knots_of.k + image_offset);
  const float* image_frac = opaque(knots_of.frac + image_offset);

#pragma unroll 1
  for (int c0 = 0; c0 < per_group; c0 += CS) {
    const int channels = per_group - c0 < CS ? per_group - c0 : CS;
    // the slice's planes (a missing second channel repeats the first: same values, written twice)
    const int64_t plane = int64_t(c0) * pixels, next = channels > 1 ? pixels : 0;
    const S* slice_x[CS] = {opaque(x + plane), opaque(x + plane + next)};
    const S* slice_dy[CS] = {opaque(dy + plane), opaque(dy + plane + next)};
    float* slice_first[CS] = {opaque(first + plane), opaque(first + plane + next)};
    const char* slice_film = reinterpret_cast<const char*>(film + c0 * knots);   // (K, 2) float4
    // without FiLM, the slice's channels' own (scale, shift): (channel[c], 0, ...) as fill_backward_segments
    // would fold a zero table, and the thread's sums of d pre and d pre * (h - mean) per channel (there is no
    // table gradient, so no tile and no sorted order)
    const float2 slice_coef[CS] = {channel[c0], channel[c0 + (channels > 1 ? 1 : 0)]};
    float sums[2 * CS] = {};
#pragma unroll 1
    for (unsigned chunk_begin = 0; chunk_begin < unsigned(pixels); chunk_begin += chunk_pixels) {
      const unsigned chunk_len = min(unsigned(chunk_pixels), unsigned(pixels) - chunk_begin);
#pragma unroll 1
      for (unsigned pixel = threadIdx.x * VEC; pixel < chunk_len; pixel += blockDim.x * VEC) {
        const unsigned at = chunk_begin + pixel;
        Pack<float, VEC> fracs{};
        float4 kept[VEC];   // per pixel -ln(2) (d pre, d pre * (h - mean)) of the slice's channels
        const float4* segments[VEC];
        if constexpr (WithFilm) {
          const Pack<int, VEC> ks = load_pack<VEC>(image_k + at);
          fracs = load_pack<VEC>(image_frac + at);
#pragma unroll
          for (int v = 0; v < VEC; ++v) segments[v] = reinterpret_cast<const float4*>(slice_film + 2 * ks.v[v]);
        }
#pragma unroll
        for (int cc = 0; cc < CS; ++cc) {
          const Pack<float, VEC> xs = load_floats<S, VEC>(slice_x[cc] + at);
          const Pack<float, VEC> dys = load_floats<S, VEC>(slice_dy[cc] + at);
          Pack<float, VEC> first_term;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            float scale = slice_coef[cc].x, shift = slice_coef[cc].y;
            if constexpr (WithFilm) {
              const float4 s = segments[v][cc];
              const float frac = fracs.v[v];
              scale = fmaf(frac, s.y, s.x);   // (fill_backward_segments)
              shift = fmaf(frac, s.w, s.z);
            }
            const float d = xs.v[v] - mu;
            const float dpre = dys.v[v] * scaled_activate_grad<Silu>(fmaf(d, scale, shift));   // -ln(2) d pre
            first_term.v[v] = dpre * scale;   // rstd * weight * dn
            if constexpr (WithFilm) {
              (cc == 0 ? kept[v].x : kept[v].z) = dpre;
              (cc == 0 ? kept[v].y : kept[v].w) = dpre * d;
            } else {
              sums[2 * cc] += dpre;
              sums[2 * cc + 1] = fmaf(dpre, d, sums[2 * cc + 1]);
            }
          }
          store_packs(slice_first[cc] + at, first_term);   // a missing channel rewrites the first
        }
        if constexpr (WithFilm) {
          float4* tile_at = reinterpret_cast<float4*>(tile) + pixel;
#pragma unroll
          for (int v = 0; v < VEC; ++v) tile_at[v] = kept[v];
        }
      }
      if constexpr (!WithFilm) continue;   // no table gradient: nothing to sum in sorted order
      __syncthreads();

      // sorted order: this thread's positions [begin, end), per_thread (a multiple of 4) from a multiple of 4
      const unsigned begin = min(threadIdx.x * unsigned(per_thread), chunk_len);
      const unsigned end = min(begin + unsigned(per_thread), chunk_len);
      const unsigned* keys = opaque(knots_of.sorted_key + image_offset + chunk_begin);
      const float* key_fracs = opaque(knots_of.sorted_frac + image_offset + chunk_begin);
      // Running sums over the thread's positions; a run's sums are their difference from the sums at its
      // start (no accumulators reset in the loop, which would cost register moves on every position).
      float total[4 * CS] = {}, start[4 * CS] = {}, first[4 * CS] = {};
      int run_k = begin < end ? int(keys[begin] & kKnotMask) : knots, first_k = knots;   // knots: no key
      // Ends the current run at the running sums `at`: the thread's first run is deferred (add_first_runs), the
      // others are this thread's alone.
      auto end_run = [&](const float (&at)[4 * CS]) {
        float run[4 * CS];
#pragma unroll
        for (int q = 0; q < 4 * CS; ++q) {
          run[q] = at[q] - start[q];
          start[q] = at[q];
        }
        if (first_k == knots) {
#pragma unroll
          for (int q = 0; q < 4 * CS; ++q) first[q] = run[q];
          first_k = run_k;
        } else {
          add_to_cell<CS>(hist + c0 * knots, knots, channels, run_k, run);
        }
      };
#pragma unroll 1
      for (unsigned i = begin; i < end; i += 4) {
        const uint4 four = *reinterpret_cast<const uint4*>(keys + i);   // (keys and fracs indexed alike)
        const float4 four_fracs = *reinterpret_cast<const float4*>(key_fracs + i);
        const unsigned key[4] = {four.x, four.y, four.z, four.w};
        const float frac[4] = {four_fracs.x, four_fracs.y, four_fracs.z, four_fracs.w};
        float4 kept[4];   // (d pre, d scale) of the slice's two channels at each position
#pragma unroll
        for (int j = 0; j < 4; ++j)
          kept[j] = *reinterpret_cast<const float4*>(reinterpret_cast<const char*>(tile) + (key[j] >> kKnotBits));
#pragma unroll
        for (int j = 0; j < 4; ++j) accumulate_pair(total, kept[j], frac[j]);
        if (int(four.x & kKnotMask) != run_k || int(four.w & kKnotMask) != run_k) {   // a run ends in these four
          float before[4 * CS];   // the sums before this group: total less its four positions
#pragma unroll
          for (int q = 0; q < 4 * CS; ++q) before[q] = total[q];
#pragma unroll
          for (int j = 0; j < 4; ++j) subtract_pair(before, kept[j], frac[j]);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int k = int(key[j] & kKnotMask);
            if (k != run_k) {
              end_run(before);
              run_k = k;
            }
            accumulate_pair(before, kept[j], frac[j]);
          }
        }
      }
      if (begin < end) end_run(total);
      add_first_runs<CS>(hist + c0 * knots, knots, channels, first_k, first, slots, knots);
      __syncthreads();   // the histogram's cells are added before the next chunk's; the tile is free again
    }
    if constexpr (!WithFilm) {
      block_sums(sums);   // the totals in thread 0
      if (threadIdx.x == 0) {
        for (int cc = 0; cc < channels; ++cc)
          channel_sums[c0 + cc] = make_float2(-kLog2e * sums[2 * cc], -kLog2e * sums[2 * cc + 1]);
      }
      __syncthreads();   // block_sums' shared partials are free for the next slice
    }
  }

  // The channel sums from the histogram: dn = d pre (1 + scale) and 1 + scale = x + frac y on segment k, x and y
  // from the table, so sum dn = sum over k of x_k A_k + y_k B_k, A and B the sums of d pre and d pre * frac;
  // likewise sum dn (h - mean) from the sums of d pre (h - mean).
  if constexpr (WithFilm) {   // (without FiLM, the slices' block sums gave them)
    if (threadIdx.x < 32) {
#pragma unroll 1
      for (int c = 0; c < per_group; ++c) {
        float dn = 0, dn_d = 0;
        const float* column = p.table + first_channel + c;
#pragma unroll 1
        for (int k = threadIdx.x; k < knots; k += 32) {
          const float* low = column + k * width;
          const float x = 1.0f + low[0], y = k < knots - 1 ? low[width] - low[0] : 0.0f;
          const float4 cell = hist[c * knots + k];
          dn = fmaf(x, cell.z, fmaf(y, cell.w, dn));
          dn_d = fmaf(x, cell.x, fmaf(y, cell.y, dn_d));
        }
        dn = -kLog2e * warp_sum(dn);
        dn_d = -kLog2e * warp_sum(dn_d);
        if (threadIdx.x == 0) channel_sums[c] = make_float2(dn, dn_d);
      }
    }
  }
  if (threadIdx.x == 0) {   // means over the group of dxhat = dn * weight and dxhat * xhat
    float mean_dxhat = 0, mean_dxhat_d = 0;
    for (int c = 0; c < per_group; ++c) {
      const float w = p.weight[first_channel + c];
      mean_dxhat = fmaf(w, channel_sums[c].x, mean_dxhat);
      mean_dxhat_d = fmaf(w, channel_sums[c].y, mean_dxhat_d);
    }
    const float slope = -rs * rs * rs * mean_dxhat_d / float(count);   // per unit of h
    correction = make_float2(-rs * mean_dxhat / float(count) - slope * mu, slope);
  }
  // the image's partials: the table gradient (K, 2C), then the bias and weight gradients (C each)
  float* image_partial = partial + b * (knots + 1) * width;
  // table gradient of segment k's knots: row k gets g (1 - frac) = A_k - B_k, row k + 1 gets g frac = B_k
#pragma unroll 1
  for (int c = 0; c < per_group; ++c) {
    const float4* cells = hist + c * knots;
    float* scale_column = opaque(image_partial + first_channel + c);
    float* shift_column = opaque(scale_column + p.channels);
    const float2 coef = channel[c];   // d scale = d pre * normalized, normalized = coef.x (h - mean) + coef.y
#pragma unroll 1
    for (int k = threadIdx.x; k < knots; k += blockDim.x) {
      const float4 cell = cells[k];
      const float4 below = k > 0 ? cells[k - 1] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      const float shift_grad = cell.z - cell.w + below.w;
      scale_column[k * int(width)] = fmaf(coef.x, cell.x - cell.y + below.y, coef.y * shift_grad);
      shift_column[k * int(width)] = -kLog2e * shift_grad;
    }
  }
  __syncthreads();
  for (int c = threadIdx.x; c < per_group; c += blockDim.x) {
    image_partial[knots * width + first_channel + c] = channel_sums[c].x;
    image_partial[knots * width + p.channels + first_channel + c] = rs * channel_sums[c].y;
  }
  const float2 rest = correction;
  const Pack<S, VEC>* h_packs = opaque(reinterpret_cast<const Pack<S, VEC>*>(x));
  const Pack<float, VEC>* first_packs = opaque(reinterpret_cast<const Pack<float, VEC>*>(first));
  Pack<S, VEC>* grad_packs = opaque(reinterpret_cast<Pack<S, VEC>*>(dx));
#pragma unroll 1
  for (unsigned pack = threadIdx.x; pack < unsigned(count / VEC); pack += blockDim.x) {
    const Pack<float, VEC> hs = load_floats<S, VEC>(h_packs[pack].v), first_term = load_pack<VEC>(first_packs[pack].v);
    Pack<S, VEC> grad;
#pragma unroll
    for (int v = 0; v < VEC; ++v) store(grad.v[v], first_term.v[v] + fmaf(hs.v[v], rest.y, rest.x));
    grad_packs[pack] = grad;
  }
}

// grad_table, grad_bias and grad_weight: the images' partials (rows of K * 2C + 2C values) summed in a fixed
// order, one thread per value.
__global__ void finalize_group_backward(const float* __restrict__ partial, int batch, int64_t table_size,
                                        int64_t channels, float* __restrict__ grad_table,
                                        float* __restrict__ grad_weight, float* __restrict__ grad_bias) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, row = table_size + 2 * channels;
  if (i >= row) return;
  float sum = 0;
  const float* value = partial + i;
#pragma unroll 1
  for (int b = 0; b < batch; ++b, value += row) sum += *value;
  float* out = i < table_size ? grad_table + i
               : i < table_size + channels ? grad_bias + (i - table_size) : grad_weight + (i - table_size - channels);
  *out = sum;
}

// ---------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------

bool aligned16(const void* address) { return reinterpret_cast<std::uintptr_t>(address) % 16 == 0; }

// Calls fn(std::integral_constant<int, VEC>) with VEC = 16 bytes of S when `vectorise`, else 1.
template <typename S, typename Fn>
void with_vec(bool vectorise, Fn&& fn) {
  constexpr int kVec = int(16 / sizeof(S));
  if (vectorise)
    fn(std::integral_constant<int, kVec>{});
  else
    fn(std::integral_constant<int, 1>{});
}

// Byte offsets of the workspace parts, each rounded to 256: the transposed table (NCHW), then the statistics
// partials (forward) or the gradient partials and group coefficients (backward) of the chunked path; then,
// where the shape can take the one-block-per-group backward, its knot records and per-image partials.
struct Workspace {
  int64_t stats, grads, coef, knot_k, knot_frac, sorted_key, sorted_frac, partial, first_term, end;
};

int64_t round256(int64_t bytes) { return ceil_div(bytes, 256) * 256; }

bool group_backward_shape(const GroupNormFilmArgs& args);

template <typename T>
Workspace workspace_parts(const GroupNormFilmArgs& args) {
  const int64_t partials = args.batch * args.channels * geometry(args).chunks;
  const int64_t columns = args.channels_last ? 0 : round256(2 * args.channels * args.knots * int64_t(sizeof(T)));
  const int64_t stats = round256(partials * int64_t(sizeof(StatsPartial<T>)));
  const int64_t grads = round256(partials * int64_t(sizeof(GradPartial<T>)));
  const int64_t coef = round256(args.batch * args.groups * 2 * int64_t(sizeof(T)));
  Workspace w{};
  w.stats = w.grads = columns;
  w.coef = columns + grads;
  int64_t end = columns + std::max(stats, grads + coef);
  if (group_backward_shape(args)) {
    const int64_t per_pixel = args.film ? round256(args.batch * args.pixels * 4) : 0;   // the knot records
    w.knot_k = end;
    w.knot_frac = w.knot_k + per_pixel;
    w.sorted_key = w.knot_frac + per_pixel;
    w.sorted_frac = w.sorted_key + per_pixel;
    w.partial = w.sorted_frac + per_pixel;
    end = w.partial + round256(args.batch * (args.knots + 1) * 2 * args.channels * 4);
    if (args.dtype == kBFloat16 || args.dtype == kFloat16) {   // grad_h's first term in float (float32: in grad_h)
      w.first_term = end;
      end += round256(args.batch * args.channels * args.pixels * 4);
    }
  }
  w.end = end;
  return w;
}

Workspace workspace_of(const GroupNormFilmArgs& args) {
  return args.dtype == kFloat64 ? workspace_parts<double>(args) : workspace_parts<float>(args);
}

void check_cuda_shape(const GroupNormFilmArgs& args) {
  check_groupnorm_film_shape(args);
  const Geometry geo = geometry(args);
  if (args.channels_last) {
    if (args.batch > 65535)
      throw std::invalid_argument("groupnorm_film (CUDA): channels_last h supports at most 65535 images");
    if (geo.chunks > 0x7FFFFFFF) throw std::invalid_argument("groupnorm_film (CUDA): too many pixels");
  } else if (args.batch * args.channels * geo.chunks > 0x7FFFFFFF) {
    throw std::invalid_argument("groupnorm_film (CUDA): too many (image, channel) planes for one launch");
  }
}

// Threads of an NCHW block: enough warps for one chunk, at most kThreads.
int nchw_threads(int64_t chunk_elems, int vec) {
  return int(std::min<int64_t>(kThreads, ceil_div(ceil_div(chunk_elems, vec), 32) * 32));
}

int flat_blocks(int64_t packs) { return int(std::min<int64_t>(ceil_div(packs, kThreads), int64_t(1) << 20)); }

int round32(int64_t n) { return int(ceil_div(n, 32) * 32); }

// Whether the shape suits the one-block-per-(image, group) kernels: NCHW, float compute (float64 would need
// twice the registers and shared memory), planes of whole 16-byte packs, and groups small enough that the
// second pass over them finds them in L2.
bool group_shape(const GroupNormFilmArgs& args) {
  if (args.channels_last || args.dtype == kFloat64 || args.batch > 65535) return false;   // grid (groups, images)
  const int64_t item = args.dtype == kFloat32 ? 4 : 2;
  return args.pixels % (16 / item) == 0 && (args.channels / args.groups) * args.pixels * item <= kGroupMaxBytes;
}

// ... and whether there are enough (image, group) blocks to fill the GPU (else the chunked path, which splits
// planes, has more parallelism) and the tensors allow 16-byte packs.
bool group_launch(const GroupNormFilmArgs& args, bool aligned, int device) {
  if (!aligned) return false;
  int multiprocessors = 0;
  check(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return args.batch * args.groups >= multiprocessors;
}

// forward_group_nchw's dynamic shared memory: the group's FiLM segments, then (rstd * weight, bias) per channel.
int64_t forward_group_shared_bytes(const GroupNormFilmArgs& args) {
  const int64_t per_group = args.channels / args.groups;
  return per_group * args.knots * int64_t(sizeof(float4)) + per_group * int64_t(sizeof(float2));
}

bool group_forward_shape(const GroupNormFilmArgs& args) {
  return group_shape(args) && forward_group_shared_bytes(args) <= kGroupFilmBytes;
}

// The backward group path's pixels per sorted chunk, threads per block (positions per thread >= kMinRun
// where the chunk allows, at least 4 warps) and dynamic shared memory (see backward_group_nchw).
int backward_chunk(const GroupNormFilmArgs& args) { return int(std::min<int64_t>(kBackChunk, args.pixels)); }

int backward_threads(const GroupNormFilmArgs& args) {
  return std::max(128, std::min(kBackThreads, round32(backward_chunk(args) / kMinRun)));
}

int64_t backward_group_shared_bytes(const GroupNormFilmArgs& args) {
  const int64_t per_group = args.channels / args.groups, film_channels = (per_group + 1) / 2 * 2;
  const int64_t tile = args.film ? kSliceChannels * int64_t(backward_chunk(args)) * int64_t(sizeof(float2)) : 0;
  return (film_channels + per_group) * args.knots * int64_t(sizeof(float4)) + 2 * per_group * int64_t(sizeof(float2)) +
         tile;
}

// knot_records: as many warps (up to 32) as leave (warps + 1) * K counts within 48 KB.
int sort_warps(const GroupNormFilmArgs& args) {
  return int(std::min<int64_t>(kSortThreads / 32, 48 * 1024 / (4 * args.knots) - 1));
}

bool group_backward_shape(const GroupNormFilmArgs& args) {
  return group_shape(args) &&
         (!args.film || (args.knots <= (1 << kKnotBits) && sort_warps(args) >= 1));   // segment keys fit
}

template <typename S>
Params<S> params(Pass pass, const GroupNormFilmArgs& a, unsigned char* workspace) {
  using T = Compute<S>;
  const Workspace parts = workspace_of(a);
  const bool forward = pass == Pass::kForward;
  return Params<S>{static_cast<const S*>(a.h),
                   static_cast<const S*>(a.grad_out),
                   static_cast<const T*>(a.u),
                   static_cast<const T*>(a.table),
                   reinterpret_cast<const T*>(workspace),
                   static_cast<const T*>(a.weight),
                   static_cast<const T*>(a.bias),
                   static_cast<const T*>(a.mean),
                   static_cast<const T*>(a.rstd),
                   reinterpret_cast<const T*>(workspace + parts.coef),
                   static_cast<S*>(forward ? a.out : a.grad_h),
                   static_cast<T*>(a.mean),
                   static_cast<T*>(a.rstd),
                   a.channels,
                   a.pixels,
                   a.groups,
                   a.channels / a.groups,
                   int(a.knots)};
}

// The NCHW kernels but the one-launch forward (which transposes its group's part of the table into shared
// memory itself) read the table as columns: its transpose, written to the start of the workspace.
template <typename T>
void transpose_into_workspace(const GroupNormFilmArgs& args, const T* table, unsigned char* workspace,
                              cudaStream_t stream) {
  const int64_t values = 2 * args.channels * args.knots;
  transpose_table<T><<<unsigned(std::min<int64_t>(ceil_div(values, kThreads), 1024)), kThreads, 0, stream>>>(
      table, args.knots, 2 * args.channels, reinterpret_cast<T*>(workspace));
  check_launch("transpose_table");
}

template <typename S, bool Silu, bool WithFilm>
void forward(const GroupNormFilmArgs& args, const Params<S>& p, unsigned char* workspace, int device,
             cudaStream_t stream) {
  using T = Compute<S>;
  constexpr int kVec = int(16 / sizeof(S));
  const Geometry geo = geometry(args);
  auto* partial = reinterpret_cast<StatsPartial<T>*>(workspace + workspace_of(args).stats);
  const bool aligned = aligned16(args.h) && aligned16(args.out);
  const int64_t B = args.batch, C = args.channels;
  const bool vectorise_nchw = aligned && aligned16(args.u) && args.pixels % kVec == 0;

  if constexpr (!std::is_same_v<S, double>) {
    if (group_forward_shape(args) && group_launch(args, vectorise_nchw, device)) {
      forward_group_nchw<S, kVec, Silu, WithFilm><<<dim3(unsigned(args.groups), unsigned(B)),
                                          std::min(kGroupThreads, round32(args.pixels / kVec)),
                                          size_t(forward_group_shared_bytes(args)), stream>>>(p, args.eps);
      check_launch("forward_group_nchw");
      return;
    }
  }
  if (args.channels_last) {
    stats_nhwc<S><<<dim3(unsigned(geo.chunks), unsigned(ceil_div(C, 32)), unsigned(B)), dim3(32, kRows), 0,
                    stream>>>(p.h, C, args.pixels, geo.chunks, partial);
    check_launch("stats_nhwc");
  } else {
    if constexpr (WithFilm) transpose_into_workspace(args, p.table, workspace, stream);
    with_vec<S>(vectorise_nchw, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      stats_nchw<S, VEC><<<unsigned(B * C * geo.chunks), nchw_threads(geo.chunk_elems, VEC), 0, stream>>>(
          p.h, args.pixels, geo.chunks, geo.chunk_elems, partial);
      check_launch("stats_nchw");
    });
  }
  const int64_t groups_total = B * args.groups;
  finalize_stats<T><<<unsigned(ceil_div(groups_total * 32, kThreads)), kThreads, 0, stream>>>(
      partial, groups_total, (C / args.groups) * geo.chunks, args.eps, p.mean_out, p.rstd_out);
  check_launch("finalize_stats");

  if (args.channels_last) {
    with_vec<S>(aligned && C % kVec == 0, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t packs = B * args.pixels * C / VEC;
      forward_apply_nhwc<S, VEC, Silu, WithFilm><<<flat_blocks(packs), kThreads, 0, stream>>>(p, packs);
      check_launch("forward_apply_nhwc");
    });
  } else {
    with_vec<S>(vectorise_nchw, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      forward_apply_nchw<S, VEC, Silu, WithFilm><<<unsigned(B * C * geo.chunks), nchw_threads(geo.chunk_elems, VEC), 0,
                                         stream>>>(p, geo.chunks, geo.chunk_elems);
      check_launch("forward_apply_nchw");
    });
  }
}

// Shared memory a block may opt in to on `device`.
int shared_optin_limit(int device) {
  int limit = 0;
  check(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "cudaDeviceGetAttribute");
  return limit;
}

// The one-block-per-group backward (knot_records, backward_group_nchw, finalize_group_backward); false, with
// nothing launched, when its shared memory exceeds what the GPU grants a block.
template <typename S, bool Silu, bool WithFilm>
bool backward_group(const GroupNormFilmArgs& args, const Params<S>& p, unsigned char* workspace, int device,
                    cudaStream_t stream) {
  constexpr int kVec = int(16 / sizeof(S));
  const int64_t shared = backward_group_shared_bytes(args);
  const int64_t static_shared = 4 * 1024;   // backward_group_nchw's own: run slots, block sums, a float2
  if (shared + static_shared > shared_optin_limit(device)) return false;
  const Workspace parts = workspace_of(args);
  const KnotRecords knots{reinterpret_cast<int*>(workspace + parts.knot_k),
                          reinterpret_cast<float*>(workspace + parts.knot_frac),
                          reinterpret_cast<unsigned*>(workspace + parts.sorted_key),
                          reinterpret_cast<float*>(workspace + parts.sorted_frac)};
  auto* partial = reinterpret_cast<float*>(workspace + parts.partial);
  const int chunk = backward_chunk(args);
  if constexpr (WithFilm) {
    const int warps = sort_warps(args);
    knot_records<<<dim3(unsigned(ceil_div(args.pixels, chunk)), unsigned(args.batch)), 32 * warps,
                   size_t((warps + 1) * args.knots * 4), stream>>>(static_cast<const float*>(args.u),
                                                                    int(args.pixels), chunk, int(args.knots), knots);
    check_launch("knot_records");
  }
  auto kernel = backward_group_nchw<S, kVec, Silu, WithFilm>;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared)), "cudaFuncSetAttribute");
  const int threads = backward_threads(args), per_thread = int(ceil_div(chunk, 4 * threads) * 4);
  kernel<<<dim3(unsigned(args.groups), unsigned(args.batch)), threads, size_t(shared), stream>>>(
      p, knots, chunk, per_thread, partial, reinterpret_cast<float*>(workspace + parts.first_term));
  check_launch("backward_group_nchw");
  const int64_t table_size = args.knots * 2 * args.channels;
  finalize_group_backward<<<unsigned(ceil_div(table_size + 2 * args.channels, kThreads)), kThreads, 0, stream>>>(
      partial, int(args.batch), table_size, args.channels, static_cast<float*>(args.grad_table),
      static_cast<float*>(args.grad_weight), static_cast<float*>(args.grad_bias));
  check_launch("finalize_group_backward");
  return true;
}

template <typename S, bool Silu, bool WithFilm>
void backward(const GroupNormFilmArgs& args, const Params<S>& p, unsigned char* workspace, int device,
              cudaStream_t stream) {
  using T = Compute<S>;
  constexpr int kVec = int(16 / sizeof(S));
  const Geometry geo = geometry(args);
  auto* partial = reinterpret_cast<GradPartial<T>*>(workspace + workspace_of(args).grads);
  auto* grad_table = static_cast<T*>(args.grad_table);
  const bool aligned = aligned16(args.h) && aligned16(args.grad_out) && aligned16(args.grad_h);
  const int64_t B = args.batch, C = args.channels;
  const bool vectorise_nchw = aligned && aligned16(args.u) && args.pixels % kVec == 0;

  if constexpr (!std::is_same_v<S, double>) {
    if (group_backward_shape(args) && group_launch(args, vectorise_nchw, device) &&
        backward_group<S, Silu, WithFilm>(args, p, workspace, device, stream))
      return;
  }
  if (args.channels_last) {
    backward_reduce_nhwc<S, Silu, WithFilm><<<dim3(unsigned(geo.chunks), unsigned(ceil_div(C, 32)), unsigned(B)),
                                              dim3(32, kRows), 0, stream>>>(p, geo.chunks, partial, grad_table);
    check_launch("backward_reduce_nhwc");
  } else {
    if constexpr (WithFilm) transpose_into_workspace(args, p.table, workspace, stream);
    const int64_t shared_bytes = 2 * args.knots * int64_t(sizeof(T));
    with_vec<S>(vectorise_nchw, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      auto kernel = backward_reduce_nchw<S, VEC, Silu, WithFilm>;
      if (shared_bytes > 48 * 1024) {
        const int limit = shared_optin_limit(device);
        if (shared_bytes > limit)
          throw std::invalid_argument("groupnorm_film (CUDA): the table has " + std::to_string(args.knots) +
                                      " rows; the NCHW backward holds 2 * rows values per block in shared "
                                      "memory, at most " + std::to_string(limit) + " bytes on this GPU");
        check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_bytes)),
              "cudaFuncSetAttribute");
      }
      kernel<<<unsigned(B * C * geo.chunks), nchw_threads(geo.chunk_elems, VEC), size_t(shared_bytes), stream>>>(
          p, geo.chunks, geo.chunk_elems, partial, grad_table);
      check_launch("backward_reduce_nchw");
    });
  }
  const int64_t warps = B * args.groups + C;
  finalize_backward<T><<<unsigned(ceil_div(warps * 32, kThreads)), kThreads, 0, stream>>>(
      partial, p.weight, B, C, args.groups, C / args.groups, geo.chunks, args.pixels,
      reinterpret_cast<T*>(workspace + workspace_of(args).coef), static_cast<T*>(args.grad_weight),
      static_cast<T*>(args.grad_bias));
  check_launch("finalize_backward");

  if (args.channels_last) {
    with_vec<S>(aligned && C % kVec == 0, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t packs = B * args.pixels * C / VEC;
      backward_apply_nhwc<S, VEC, Silu, WithFilm><<<flat_blocks(packs), kThreads, 0, stream>>>(p, packs);
      check_launch("backward_apply_nhwc");
    });
  } else {
    with_vec<S>(vectorise_nchw, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      backward_apply_nchw<S, VEC, Silu, WithFilm><<<unsigned(B * C * geo.chunks), nchw_threads(geo.chunk_elems, VEC), 0,
                                          stream>>>(p, geo.chunks, geo.chunk_elems);
      check_launch("backward_apply_nchw");
    });
  }
}

}  // namespace

std::int64_t groupnorm_film_cuda_workspace_bytes(const GroupNormFilmArgs& args) {
  check_cuda_shape(args);
  return workspace_of(args).end;
}

void groupnorm_film_cuda(Pass pass, const GroupNormFilmArgs& args, const CudaLaunch& launch) {
  check_cuda_shape(args);
  check(cudaSetDevice(launch.device), "cudaSetDevice");
  const auto stream = static_cast<cudaStream_t>(launch.stream);
  auto* workspace = static_cast<unsigned char*>(launch.workspace);
  dispatch_dtype<__nv_bfloat16, __half>(args.dtype, "groupnorm_film", [&](auto storage) {
    using S = decltype(storage);
    const Params<S> p = params<S>(pass, args, workspace);
    dispatch_act(args.silu, [&](auto act) {
      constexpr bool Silu = decltype(act)::value;
      dispatch_bool(args.film, [&](auto film) {
        constexpr bool WithFilm = decltype(film)::value;
        if (pass == Pass::kForward)
          forward<S, Silu, WithFilm>(args, p, workspace, launch.device, stream);
        else
          backward<S, Silu, WithFilm>(args, p, workspace, launch.device, stream);
      });
    });
  });
}

}  // namespace svnr
