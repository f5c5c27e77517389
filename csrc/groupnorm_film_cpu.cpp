// Fused GroupNorm + spatial FiLM + SiLU on the CPU (DESIGN.md §1.6), forward and backward.
//
// Threads: OpenMP, as many as the caller passes (torch.get_num_threads()). Inner loops run over
// contiguous memory and call only the branch-free math of svnr_math.h, so the compiler vectorises them.
//
// NCHW (the main layout). One task per (image, group) in the forward: the group is contiguous, so its
// statistics (two passes: mean, then squared deviations) and the apply pass reread it from the core's
// cache: h comes from memory once. Per pixel, the segment k and frac of the time map are computed once
// per image; each channel then reads one record (scale_k, d scale, shift_k, d shift) per pixel, several
// pixels' records transposed in registers (lerp_records), before a vectorised loop applies the FiLM.
// The backward runs one task per (group, slice of images); the task owns its channels' columns of its
// slice's table-gradient buffer (double), so it accumulates them without atomics; a first pass over each
// group computes dn and the table gradient, a second pass writes grad_h from the cached dn.
//
// NHWC (channels_last): loops over pixels, channels innermost, so the table rows, weight, bias and the
// per-channel statistics are all contiguous vectors. Statistics are per-(image, channel) sums of
// shifted values over pixel blocks, merged per group (Chan); the backward accumulates the table
// gradient per slice of the pixel blocks, slices summed in order.
//
// Without FiLM (GroupNormFilmArgs::film false, svnr::groupnorm_silu), every kernel is instantiated with
// WithFilm = false: u and the table are never read, no knots, records or table-gradient buffers are built,
// and the per-element math is that of a zero table (film(n, 0, 0) = n exactly), in the same order of sums.
// The backward's slices then only spread the work: the table-gradient buffers they bound are not needed.
//
// Every sum has a fixed order that depends on the shape and the instruction set only: results are the same
// for any thread count.
//
// Bytes per element that must move (float32; half for bfloat16/float16): forward 8 (read h, write out),
// backward 12 (read grad_out and h, write grad_h). NCHW reads h from memory once in the forward (the
// later passes over a group hit the core's cache) and grad_out and h once in the backward; NHWC reads
// each twice. 8x64x128x128 float32 (8.4M elements) moves at least 67 MB forward and 101 MB backward; a
// torch copy_ of that size took 1.9 ms on this 2-core AMD EPYC (Zen 5, AVX-512) when it was quiet. The
// forward is compute bound: one thread's CPU time per call at that size, best of 30, AVX-512: 8.3 ms
// (10.1 with four emulated gathers per element instead of the records); AVX2 11.1 (12.2).
#include <cmath>

#include "cpu_common.h"

namespace svnr {
namespace SVNR_CPU_NAMESPACE {
namespace {

// Sums in the compute type over blocks of this many elements (vector lanes: short, accurate partial
// sums), blocks accumulated in double.
constexpr int64_t kSumBlock = 2048;

// Pixel block of the NHWC tasks.
constexpr int64_t kPixelBlock = 256;

// GroupNormFilmArgs with typed pointers and the shape as the kernels use it.
template <typename S>
struct Film {
  using T = Compute<S>;
  int64_t B, C, HW, G;
  int K;
  const S* h;
  const T* u;
  const T* table;   // (K, 2C)
  const T* weight;
  const T* bias;
  S* out;
  T* mean;
  T* rstd;
  const S* grad_out;
  S* grad_h;
  T* grad_table;
  T* grad_weight;
  T* grad_bias;
  double eps;
};

template <typename S>
Film<S> typed(const GroupNormFilmArgs& a) {
  using T = Compute<S>;
  return {a.batch,
          a.channels,
          a.pixels,
          a.groups,
          int(a.knots),
          static_cast<const S*>(a.h),
          static_cast<const T*>(a.u),
          static_cast<const T*>(a.table),
          static_cast<const T*>(a.weight),
          static_cast<const T*>(a.bias),
          static_cast<S*>(a.out),
          static_cast<T*>(a.mean),
          static_cast<T*>(a.rstd),
          static_cast<const S*>(a.grad_out),
          static_cast<S*>(a.grad_h),
          static_cast<T*>(a.grad_table),
          static_cast<T*>(a.grad_weight),
          static_cast<T*>(a.grad_bias),
          a.eps};
}

// The table as the NCHW kernels read it, one channel over many pixels: per channel c and segment k in
// [0, K - 2] the record (scale_k, scale_k+1 - scale_k, shift_k, shift_k+1 - shift_k), so that a pixel's lerp
// reads one 16-byte record (float) and scale_k + frac * (scale_k+1 - scale_k) is the reference's lerp exactly.
template <typename T>
Buffer<T> film_records(const T* table, int64_t C, int64_t K) {
  Buffer<T> records(C * (K - 1) * 4);
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < K - 1; ++k) {
      const T* row = table + k * 2 * C;
      const T* next = row + 2 * C;
      T* record = records.data() + (c * (K - 1) + k) * 4;
      record[0] = row[c];
      record[1] = next[c] - row[c];
      record[2] = row[C + c];
      record[3] = next[C + c] - row[C + c];
    }
  }
  return records;
}

// scale and shift of one channel at n pixels from its records (film_records) and the pixels' segments and
// fractions. For float, the records of 4, 8 or 16 pixels (SSE, AVX, AVX-512) are loaded whole and transposed in
// registers into (scale_k, d scale, shift_k, d shift) vectors: GCC's own code reads the four values as four
// emulated gathers (10 of the forward's 15 instructions per element with AVX2, callgrind), and hardware
// gathers are 2-3x slower still on this AMD machine.
#if defined(__AVX512F__)
constexpr int kRecordLanes = 16;
#elif defined(__AVX__)
constexpr int kRecordLanes = 8;
#else
constexpr int kRecordLanes = 4;
#endif

#if defined(__SSE2__)
// Four pixels' records at `records + 4 * k[0..3]` transposed: lane j of s, ds, h, dh is pixel j's.
inline void transpose_records(const float* records, const std::int32_t* k, __m128& s, __m128& ds, __m128& h,
                              __m128& dh) {
  s = _mm_loadu_ps(records + 4 * k[0]);
  ds = _mm_loadu_ps(records + 4 * k[1]);
  h = _mm_loadu_ps(records + 4 * k[2]);
  dh = _mm_loadu_ps(records + 4 * k[3]);
  _MM_TRANSPOSE4_PS(s, ds, h, dh);
}
#endif

template <typename T>
void lerp_records(const T* records, const std::int32_t* k, const T* frac, int64_t n, T* scale, T* shift) {
  int64_t p = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    for (; p + kRecordLanes <= n; p += kRecordLanes) {
#if defined(__AVX512F__)
      __m128 s[4], ds[4], h[4], dh[4];
      for (int part = 0; part < 4; ++part) transpose_records(records, k + p + 4 * part, s[part], ds[part], h[part], dh[part]);
      auto join = [](const __m128* q) {
        const __m512 low = _mm512_insertf32x4(_mm512_castps128_ps512(q[0]), q[1], 1);
        return _mm512_insertf32x4(_mm512_insertf32x4(low, q[2], 2), q[3], 3);
      };
      const __m512 f = _mm512_loadu_ps(frac + p);
      _mm512_storeu_ps(scale + p, _mm512_add_ps(join(s), _mm512_mul_ps(f, join(ds))));
      _mm512_storeu_ps(shift + p, _mm512_add_ps(join(h), _mm512_mul_ps(f, join(dh))));
#elif defined(__AVX__)
      __m128 s0, ds0, h0, dh0, s1, ds1, h1, dh1;
      transpose_records(records, k + p, s0, ds0, h0, dh0);
      transpose_records(records, k + p + 4, s1, ds1, h1, dh1);
      auto join = [](__m128 low, __m128 high) { return _mm256_insertf128_ps(_mm256_castps128_ps256(low), high, 1); };
      const __m256 f = _mm256_loadu_ps(frac + p);
      _mm256_storeu_ps(scale + p, _mm256_add_ps(join(s0, s1), _mm256_mul_ps(f, join(ds0, ds1))));
      _mm256_storeu_ps(shift + p, _mm256_add_ps(join(h0, h1), _mm256_mul_ps(f, join(dh0, dh1))));
#else
      __m128 s, ds, h, dh;
      transpose_records(records, k + p, s, ds, h, dh);
      const __m128 f = _mm_loadu_ps(frac + p);
      _mm_storeu_ps(scale + p, _mm_add_ps(s, _mm_mul_ps(f, ds)));
      _mm_storeu_ps(shift + p, _mm_add_ps(h, _mm_mul_ps(f, dh)));
#endif
    }
  }
#endif
  for (; p < n; ++p) {
    const T* record = records + 4 * k[p];
    scale[p] = record[0] + frac[p] * record[1];
    shift[p] = record[2] + frac[p] * record[3];
  }
}

// Per pixel of every image: the table segment k and frac of u (math::knot).
template <typename T>
struct Knots {
  Buffer<std::int32_t> k;
  Buffer<T> frac;
};

template <typename T>
Knots<T> knots_of(const T* u, int64_t count, int K, int threads) {
  Knots<T> knots{Buffer<std::int32_t>(count), Buffer<T>(count)};
  std::int32_t* k = knots.k.data();
  T* frac = knots.frac.data();
#pragma omp parallel for simd num_threads(threads) schedule(static)
  for (int64_t i = 0; i < count; ++i) {
    const math::Knot<T> knot = math::knot(u[i], K);
    k[i] = knot.k;
    frac[i] = knot.frac;
  }
  return knots;
}

template <typename S>
double sum_of(const S* x, int64_t count) {
  using T = Compute<S>;
  double total = 0;
  for (int64_t start = 0; start < count; start += kSumBlock) {
    const int64_t end = min64(count, start + kSumBlock);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = start; i < end; ++i) sum += load(x[i]);
    total += sum;
  }
  return total;
}

template <typename S>
double squared_deviations(const S* x, int64_t count, Compute<S> mean) {
  using T = Compute<S>;
  double total = 0;
  for (int64_t start = 0; start < count; start += kSumBlock) {
    const int64_t end = min64(count, start + kSumBlock);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = start; i < end; ++i) {
      const T d = load(x[i]) - mean;
      sum += d * d;
    }
    total += sum;
  }
  return total;
}

// ---------------------------------------------------------------------------------------------------
// NCHW
// ---------------------------------------------------------------------------------------------------

// Per-thread rows of scale(u) and shift(u) for a tile of kTile pixels.
template <typename T>
struct FilmRows {
  Buffer<T> scale, shift;
  explicit FilmRows(int64_t pixels) : scale(pixels), shift(pixels) {}
};

// One channel plane: out = act(film(xhat * w + b, scale(u), shift(u))).
template <typename S, bool Silu>
void forward_plane(const S* x, S* out, int64_t pixels, const std::int32_t* knot_k,
                   const Compute<S>* knot_frac, const Compute<S>* records, Compute<S> mean, Compute<S> rstd,
                   Compute<S> w, Compute<S> b, FilmRows<Compute<S>>& film) {
  using T = Compute<S>;
  for (int64_t start = 0; start < pixels; start += kTile) {
    const int64_t n = min64(kTile, pixels - start);
    lerp_records(records, knot_k + start, knot_frac + start, n, film.scale.data(), film.shift.data());
    const T* scale = film.scale.data();
    const T* shift = film.shift.data();
    const S* xs = x + start;
    S* ys = out + start;
#pragma omp simd
    for (int64_t p = 0; p < n; ++p) {
      const T normed = math::normalize(load(xs[p]), mean, rstd) * w + b;
      store(ys[p], math::activate<Silu>(math::film(normed, scale[p], shift[p])));
    }
  }
}

// Without FiLM: no knots (u is not read) and no records.
template <bool WithFilm, typename T>
Knots<T> knots_if(const T* u, int64_t count, int K, int threads) {
  if constexpr (WithFilm) return knots_of(u, count, K, threads);
  return {};
}

template <bool WithFilm, typename T>
Buffer<T> film_records_if(const T* table, int64_t C, int64_t K) {
  if constexpr (WithFilm) return film_records(table, C, K);
  return {};
}

template <typename S, bool Silu, bool WithFilm>
void forward_nchw(const Film<S>& f, int threads) {
  using T = Compute<S>;
  const int64_t B = f.B, C = f.C, HW = f.HW, G = f.G;
  const int K = f.K;
  const int64_t per_group = C / G, count = per_group * HW;
  const Knots<T> knots = knots_if<WithFilm>(f.u, B * HW, K, threads);
  const Buffer<T> records = film_records_if<WithFilm>(f.table, C, K);

#pragma omp parallel num_threads(threads)
  {
  FilmRows<T> film(WithFilm ? kTile : 0);
#pragma omp for schedule(static)
  for (int64_t task = 0; task < B * G; ++task) {
    const int64_t b = task / G, g = task % G;
    const S* x = f.h + (b * C + g * per_group) * HW;
    const T mu = T(sum_of(x, count) / double(count));
    const T rs = T(1.0 / std::sqrt(squared_deviations(x, count, mu) / double(count) + f.eps));
    f.mean[task] = mu;
    f.rstd[task] = rs;
    for (int64_t i = 0; i < per_group; ++i) {
      const int64_t c = g * per_group + i;
      const S* xc = x + i * HW;
      S* out = f.out + (b * C + c) * HW;
      if constexpr (WithFilm) {
        forward_plane<S, Silu>(xc, out, HW, knots.k.data() + b * HW, knots.frac.data() + b * HW,
                               records.data() + c * (K - 1) * 4, mu, rs, f.weight[c], f.bias[c], film);
      } else {
        const T w = f.weight[c], bias = f.bias[c];
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p)
          store(out[p], math::activate<Silu>(math::normalize(load(xc[p]), mu, rs) * w + bias));
      }
    }
  }
  }
}

// First backward pass over one channel plane: dn (kept for the second pass) and the per-pixel table
// gradients dscale, dpre (= dshift); returns the plane's sums of dn and dn * xhat. dscale and dshift first
// hold the plane's scale(u) and shift(u), each pixel's read before its gradient replaces it.
struct PlaneSums {
  double dn;
  double dn_xhat;
};

// Without FiLM, knot_k, knot_frac, records, dscale and dshift are unused (null).
template <typename S, bool Silu, bool WithFilm>
PlaneSums backward_plane(const S* grad_out, const S* x, int64_t pixels, const std::int32_t* knot_k,
                         const Compute<S>* knot_frac, const Compute<S>* records, Compute<S> mean,
                         Compute<S> rstd, Compute<S> w, Compute<S> b, Compute<S>* dn, Compute<S>* dscale,
                         Compute<S>* dshift) {
  using T = Compute<S>;
  if constexpr (WithFilm) lerp_records(records, knot_k, knot_frac, pixels, dscale, dshift);
  PlaneSums sums{0, 0};
  for (int64_t start = 0; start < pixels; start += kSumBlock) {
    const int64_t end = min64(pixels, start + kSumBlock);
    T sum_dn = 0, sum_dn_xhat = 0;
#pragma omp simd reduction(+ : sum_dn, sum_dn_xhat)
    for (int64_t p = start; p < end; ++p) {
      const T xhat = math::normalize(load(x[p]), mean, rstd);
      T grad_n;
      if constexpr (WithFilm) {
        const math::FilmGrad<T> grad =
            math::film_grad<Silu>(T(load(grad_out[p])), xhat, w, b, dscale[p], dshift[p]);
        grad_n = grad.dn;
        dscale[p] = grad.dscale;
        dshift[p] = grad.dpre;
      } else {
        grad_n = T(load(grad_out[p])) * math::activate_grad<Silu>(xhat * w + b);
      }
      dn[p] = grad_n;
      sum_dn += grad_n;
      sum_dn_xhat += grad_n * xhat;
    }
    sums.dn += sum_dn;
    sums.dn_xhat += sum_dn_xhat;
  }
  return sums;
}

// Table-gradient accumulator of one channel: per segment k, the sums of g and g * frac of the pixels in
// that segment, for g = dscale and g = dshift. Row k of the gradient is then S[k] - F[k] + F[k - 1]
// (weights 1 - frac on row k, frac on row k + 1), which needs one 32-byte read-modify-write per pixel.
struct SegmentSums {
  double scale, scale_frac, shift, shift_frac;
};

// The backward accumulates the table gradient in slices of the work, each with its own buffer of
// C x K SegmentSums, summed in slice order at the end: up to kSliceTasks parallel tasks, fewer when the
// buffers would take more than kSliceBudgetBytes or when a slice would do less than
// kSliceElementsPerEntry elements of work per buffer entry (zeroing and summing the buffers would then
// cost as much as the work). The split depends on the shape only, so results do not depend on the
// number of threads.
constexpr int64_t kSliceTasks = 64;
constexpr int64_t kSliceBudgetBytes = int64_t(64) << 20;
constexpr int64_t kSliceElementsPerEntry = 16;

int64_t slice_count(int64_t wanted, int64_t elements, int64_t C, int64_t K) {
  const int64_t entries = C * K;
  const int64_t by_memory = kSliceBudgetBytes / (entries * int64_t(sizeof(SegmentSums)));
  const int64_t by_work = elements / (kSliceElementsPerEntry * entries);
  return max64(1, min64(wanted, min64(by_memory, by_work)));
}

// Adds the rows of `segments` (C channels x K segments) into grad (K, 2C).
void add_segment_rows(const SegmentSums* segments, int64_t C, int64_t K, double* grad) {
  for (int64_t c = 0; c < C; ++c) {
    const SegmentSums* s = segments + c * K;
    for (int64_t k = 0; k < K; ++k) {
      const double scale_from_below = k > 0 ? s[k - 1].scale_frac : 0.0;
      const double shift_from_below = k > 0 ? s[k - 1].shift_frac : 0.0;
      grad[k * 2 * C + c] += s[k].scale - s[k].scale_frac + scale_from_below;
      grad[k * 2 * C + C + c] += s[k].shift - s[k].shift_frac + shift_from_below;
    }
  }
}

template <typename T>
void accumulate_segments(SegmentSums* segments, int64_t pixels, const std::int32_t* knot_k,
                         const T* knot_frac, const T* dscale, const T* dshift) {
  for (int64_t p = 0; p < pixels; ++p) {
    SegmentSums& s = segments[knot_k[p]];
    const double frac = knot_frac[p], g_scale = dscale[p], g_shift = dshift[p];
    s.scale += g_scale;
    s.scale_frac += g_scale * frac;
    s.shift += g_shift;
    s.shift_frac += g_shift * frac;
  }
}

template <typename S, bool Silu, bool WithFilm>
void backward_nchw(const Film<S>& f, int threads) {
  using T = Compute<S>;
  const int64_t B = f.B, C = f.C, HW = f.HW, G = f.G;
  const int K = f.K;
  const int64_t per_group = C / G, count = per_group * HW;
  const Knots<T> knots = knots_if<WithFilm>(f.u, B * HW, K, threads);
  const Buffer<T> records = film_records_if<WithFilm>(f.table, C, K);

  // one task per (group, slice of the images); the task owns its group's channels in its slice's buffer
  const int64_t wanted = min64(B, (kSliceTasks + G - 1) / G);
  const int64_t slices = WithFilm ? slice_count(wanted, B * C * HW, C, K) : wanted;
  Buffer<SegmentSums> segments(WithFilm ? slices * C * K : 0, SegmentSums{0, 0, 0, 0});
  Buffer<double> plane_dn(B * C), plane_dn_xhat(B * C);

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < G * slices; ++task) {
    const int64_t g = task / slices, slice = task % slices;
    Buffer<T> dn(count), dscale(WithFilm ? HW : 0), dshift(WithFilm ? HW : 0);
    for (int64_t b = slice * B / slices; b < (slice + 1) * B / slices; ++b) {
      const int64_t group_offset = (b * C + g * per_group) * HW;
      const T mu = f.mean[b * G + g], rs = f.rstd[b * G + g];
      const std::int32_t* knot_k = WithFilm ? knots.k.data() + b * HW : nullptr;
      const T* knot_frac = WithFilm ? knots.frac.data() + b * HW : nullptr;
      double sum_dxhat = 0, sum_dxhat_xhat = 0;
      for (int64_t i = 0; i < per_group; ++i) {
        const int64_t c = g * per_group + i, offset = group_offset + i * HW;
        const PlaneSums sums = backward_plane<S, Silu, WithFilm>(
            f.grad_out + offset, f.h + offset, HW, knot_k, knot_frac,
            WithFilm ? records.data() + c * (K - 1) * 4 : nullptr, mu, rs, f.weight[c], f.bias[c],
            dn.data() + i * HW, dscale.data(), dshift.data());
        if constexpr (WithFilm)
          accumulate_segments(segments.data() + (slice * C + c) * K, HW, knot_k, knot_frac, dscale.data(),
                              dshift.data());
        plane_dn[b * C + c] = sums.dn;
        plane_dn_xhat[b * C + c] = sums.dn_xhat;
        sum_dxhat += f.weight[c] * sums.dn;
        sum_dxhat_xhat += f.weight[c] * sums.dn_xhat;
      }
      const T mean_dxhat = T(sum_dxhat / double(count)), mean_dxhat_xhat = T(sum_dxhat_xhat / double(count));
      for (int64_t i = 0; i < per_group; ++i) {
        const int64_t offset = group_offset + i * HW;
        const T w = f.weight[g * per_group + i];
        const S* x = f.h + offset;
        const T* dn_plane = dn.data() + i * HW;
        S* out = f.grad_h + offset;
#pragma omp simd
        for (int64_t p = 0; p < HW; ++p) {
          const T xhat = math::normalize(load(x[p]), mu, rs);
          store(out[p], math::groupnorm_grad_input(dn_plane[p], w, xhat, rs, mean_dxhat, mean_dxhat_xhat));
        }
      }
    }
  }

  if constexpr (WithFilm) {
    Buffer<double> grad(K * 2 * C, 0.0);
    for (int64_t slice = 0; slice < slices; ++slice)
      add_segment_rows(segments.data() + slice * C * K, C, K, grad.data());
    for (int64_t i = 0; i < K * 2 * C; ++i) f.grad_table[i] = T(grad[i]);
  }
  for (int64_t c = 0; c < C; ++c) {
    double dw = 0, db = 0;
    for (int64_t b = 0; b < B; ++b) {
      dw += plane_dn_xhat[b * C + c];
      db += plane_dn[b * C + c];
    }
    f.grad_weight[c] = T(dw);
    f.grad_bias[c] = T(db);
  }
}

// ---------------------------------------------------------------------------------------------------
// NHWC (channels_last)
// ---------------------------------------------------------------------------------------------------

// Per-(image, group) mean and rstd of NHWC data, and the same expanded per (image, channel).
template <typename T>
struct ChannelStats {
  Buffer<T> mean, rstd;   // (B, C)
};

template <typename S>
ChannelStats<Compute<S>> statistics_nhwc(const Film<S>& f, int threads) {
  using T = Compute<S>;
  const int64_t B = f.B, C = f.C, HW = f.HW, G = f.G;
  const int64_t per_group = C / G, blocks = (HW + kPixelBlock - 1) / kPixelBlock;
  // per (image, block, channel): sums of x - shift and (x - shift)^2, shift = the channel's first pixel
  Buffer<double> partial(B * blocks * C * 2);

#pragma omp parallel num_threads(threads)
  {
    Buffer<T> sum(C), sum_sq(C), shift(C);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * blocks; ++task) {
      const int64_t b = task / blocks, block = task % blocks;
      const S* image = f.h + b * HW * C;
      for (int64_t c = 0; c < C; ++c) shift[c] = load(image[c]);
      for (int64_t c = 0; c < C; ++c) sum[c] = sum_sq[c] = T(0);
      for (int64_t p = block * kPixelBlock; p < min64(HW, (block + 1) * kPixelBlock); ++p) {
        const S* x = image + p * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T d = load(x[c]) - shift[c];
          sum[c] += d;
          sum_sq[c] += d * d;
        }
      }
      double* out = partial.data() + task * C * 2;
      for (int64_t c = 0; c < C; ++c) {
        out[2 * c] = sum[c];
        out[2 * c + 1] = sum_sq[c];
      }
    }
  }

  ChannelStats<T> stats{Buffer<T>(B * C), Buffer<T>(B * C)};
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      math::Moments<double> group{0, 0, 0};
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        double sum = 0, sum_sq = 0;
        for (int64_t block = 0; block < blocks; ++block) {
          sum += partial[((b * blocks + block) * C + c) * 2];
          sum_sq += partial[((b * blocks + block) * C + c) * 2 + 1];
        }
        group = math::merge(group, math::moments_from_shifted_sums(double(HW), double(load(f.h[b * HW * C + c])),
                                                                   sum, sum_sq));
      }
      const T mu = T(group.mean), rs = T(math::inverse_std(group.m2, group.count, f.eps));
      f.mean[b * G + g] = mu;
      f.rstd[b * G + g] = rs;
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        stats.mean[b * C + c] = mu;
        stats.rstd[b * C + c] = rs;
      }
    }
  }
  return stats;
}

template <typename S, bool Silu, bool WithFilm>
void forward_nhwc(const Film<S>& f, int threads) {
  using T = Compute<S>;
  const int64_t B = f.B, C = f.C, HW = f.HW;
  const int64_t blocks = (HW + kPixelBlock - 1) / kPixelBlock;
  const ChannelStats<T> stats = statistics_nhwc(f, threads);

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < B * blocks; ++task) {
    const int64_t b = task / blocks, block = task % blocks;
    const T* mu = stats.mean.data() + b * C;
    const T* rs = stats.rstd.data() + b * C;
    for (int64_t p = block * kPixelBlock; p < min64(HW, (block + 1) * kPixelBlock); ++p) {
      const S* x = f.h + (b * HW + p) * C;
      S* y = f.out + (b * HW + p) * C;
      if constexpr (WithFilm) {
        const math::Knot<T> knot = math::knot(f.u[b * HW + p], f.K);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const math::ScaleShift<T> film = math::film_at(f.table + c, f.table + C + c, 2 * C, knot);
          const T n = math::normalize(load(x[c]), mu[c], rs[c]) * f.weight[c] + f.bias[c];
          store(y[c], math::activate<Silu>(math::film(n, film.scale, film.shift)));
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)
          store(y[c], math::activate<Silu>(math::normalize(load(x[c]), mu[c], rs[c]) * f.weight[c] + f.bias[c]));
      }
    }
  }
}

template <typename S, bool Silu, bool WithFilm>
void backward_nhwc(const Film<S>& f, int threads) {
  using T = Compute<S>;
  const int64_t B = f.B, C = f.C, HW = f.HW, G = f.G;
  const int K = f.K;
  const int64_t per_group = C / G, count = per_group * HW;
  const int64_t blocks = (HW + kPixelBlock - 1) / kPixelBlock;
  Buffer<T> mean_c(B * C), rstd_c(B * C);
  for (int64_t i = 0; i < B * C; ++i) {
    mean_c[i] = f.mean[i / C * G + i % C / per_group];
    rstd_c[i] = f.rstd[i / C * G + i % C / per_group];
  }
  // per (image, block, channel): sums of dn and dn * xhat
  Buffer<double> partial(B * blocks * C * 2);
  // per slice of the (image, pixel block) tasks: sums of g and g * frac per (channel, segment k) of the
  // table gradient, g = d[scale | shift]
  const int64_t tasks = B * blocks;
  const int64_t wanted = min64(tasks, kSliceTasks);
  const int64_t slices = WithFilm ? slice_count(wanted, B * C * HW, C, K) : wanted;
  Buffer<SegmentSums> segments(WithFilm ? slices * K * C : 0, SegmentSums{0, 0, 0, 0});

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t slice = 0; slice < slices; ++slice) {
    Buffer<T> sum_dn(C), sum_dn_xhat(C);
    SegmentSums* slice_segments = segments.data() + slice * K * C;   // (K, C) here: channels innermost
    for (int64_t task = slice * tasks / slices; task < (slice + 1) * tasks / slices; ++task) {
      const int64_t b = task / blocks, block = task % blocks;
      const T* mu = mean_c.data() + b * C;
      const T* rs = rstd_c.data() + b * C;
      for (int64_t c = 0; c < C; ++c) sum_dn[c] = sum_dn_xhat[c] = T(0);
      for (int64_t p = block * kPixelBlock; p < min64(HW, (block + 1) * kPixelBlock); ++p) {
        const S* x = f.h + (b * HW + p) * C;
        const S* dy = f.grad_out + (b * HW + p) * C;
        if constexpr (WithFilm) {
          const math::Knot<T> knot = math::knot(f.u[b * HW + p], K);
          SegmentSums* seg = slice_segments + knot.k * C;
          const double frac = knot.frac;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const math::ScaleShift<T> film = math::film_at(f.table + c, f.table + C + c, 2 * C, knot);
            const T xhat = math::normalize(load(x[c]), mu[c], rs[c]);
            const math::FilmGrad<T> grad =
                math::film_grad<Silu>(T(load(dy[c])), xhat, f.weight[c], f.bias[c], film.scale, film.shift);
            sum_dn[c] += grad.dn;
            sum_dn_xhat[c] += grad.dn * xhat;
            seg[c].scale += grad.dscale;
            seg[c].scale_frac += grad.dscale * frac;
            seg[c].shift += grad.dpre;
            seg[c].shift_frac += grad.dpre * frac;
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const T xhat = math::normalize(load(x[c]), mu[c], rs[c]);
            const T dn = T(load(dy[c])) * math::activate_grad<Silu>(xhat * f.weight[c] + f.bias[c]);
            sum_dn[c] += dn;
            sum_dn_xhat[c] += dn * xhat;
          }
        }
      }
      double* out = partial.data() + task * C * 2;
      for (int64_t c = 0; c < C; ++c) {
        out[2 * c] = sum_dn[c];
        out[2 * c + 1] = sum_dn_xhat[c];
      }
    }
  }

  if constexpr (WithFilm) {
    // (slice, K, C) -> per slice (C, K), the layout add_segment_rows reads
    Buffer<double> grad(K * 2 * C, 0.0);
    Buffer<SegmentSums> by_channel(C * K);
    for (int64_t slice = 0; slice < slices; ++slice) {
      for (int64_t k = 0; k < K; ++k)
        for (int64_t c = 0; c < C; ++c) by_channel[c * K + k] = segments[(slice * K + k) * C + c];
      add_segment_rows(by_channel.data(), C, K, grad.data());
    }
    for (int64_t i = 0; i < K * 2 * C; ++i) f.grad_table[i] = T(grad[i]);
  }

  // per (image, channel): the group means of dxhat and dxhat * xhat, broadcast to the group's channels
  Buffer<T> mean_dxhat(B * C), mean_dxhat_xhat(B * C);
  Buffer<double> dw(C, 0.0), db(C, 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      double sum_dxhat = 0, sum_dxhat_xhat = 0;
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        double s_dn = 0, s_dn_xhat = 0;
        for (int64_t block = 0; block < blocks; ++block) {
          s_dn += partial[((b * blocks + block) * C + c) * 2];
          s_dn_xhat += partial[((b * blocks + block) * C + c) * 2 + 1];
        }
        db[c] += s_dn;
        dw[c] += s_dn_xhat;
        sum_dxhat += f.weight[c] * s_dn;
        sum_dxhat_xhat += f.weight[c] * s_dn_xhat;
      }
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        mean_dxhat[b * C + c] = T(sum_dxhat / double(count));
        mean_dxhat_xhat[b * C + c] = T(sum_dxhat_xhat / double(count));
      }
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    f.grad_weight[c] = T(dw[c]);
    f.grad_bias[c] = T(db[c]);
  }

#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t task = 0; task < B * blocks; ++task) {
    const int64_t b = task / blocks, block = task % blocks;
    const T* mu = mean_c.data() + b * C;
    const T* rs = rstd_c.data() + b * C;
    const T* m1 = mean_dxhat.data() + b * C;
    const T* m2 = mean_dxhat_xhat.data() + b * C;
    for (int64_t p = block * kPixelBlock; p < min64(HW, (block + 1) * kPixelBlock); ++p) {
      const S* x = f.h + (b * HW + p) * C;
      const S* dy = f.grad_out + (b * HW + p) * C;
      S* dx = f.grad_h + (b * HW + p) * C;
      if constexpr (WithFilm) {
        const math::Knot<T> knot = math::knot(f.u[b * HW + p], K);
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const math::ScaleShift<T> film = math::film_at(f.table + c, f.table + C + c, 2 * C, knot);
          const T xhat = math::normalize(load(x[c]), mu[c], rs[c]);
          const math::FilmGrad<T> grad =
              math::film_grad<Silu>(T(load(dy[c])), xhat, f.weight[c], f.bias[c], film.scale, film.shift);
          store(dx[c], math::groupnorm_grad_input(grad.dn, f.weight[c], xhat, rs[c], m1[c], m2[c]));
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const T xhat = math::normalize(load(x[c]), mu[c], rs[c]);
          const T dn = T(load(dy[c])) * math::activate_grad<Silu>(xhat * f.weight[c] + f.bias[c]);
          store(dx[c], math::groupnorm_grad_input(dn, f.weight[c], xhat, rs[c], m1[c], m2[c]));
        }
      }
    }
  }
}

}  // namespace

void groupnorm_film(Pass pass, const GroupNormFilmArgs& args, int threads) {
  const int64_t elements = args.batch * args.channels * args.pixels;
  threads = thread_count(threads, elements);
  advise_huge_pages(pass == Pass::kForward ? args.out : args.grad_h, elements * element_size(args.dtype));
  dispatch(args.dtype, "groupnorm_film", [&](auto storage) {
    using S = decltype(storage);
    const Film<S> film = typed<S>(args);
    dispatch_act(args.silu, [&](auto act) {
      constexpr bool Silu = decltype(act)::value;
      dispatch_bool(args.film, [&](auto with_film) {
        constexpr bool WithFilm = decltype(with_film)::value;
        if (pass == Pass::kForward)
          (args.channels_last ? forward_nhwc<S, Silu, WithFilm> : forward_nchw<S, Silu, WithFilm>)(film, threads);
        else
          (args.channels_last ? backward_nhwc<S, Silu, WithFilm> : backward_nchw<S, Silu, WithFilm>)(film, threads);
      });
    });
  });
}

}  // namespace SVNR_CPU_NAMESPACE
}  // namespace svnr
