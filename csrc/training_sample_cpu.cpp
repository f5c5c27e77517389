// The SVNR training sample on the CPU (DESIGN.md §1.4): the same function as
// svnr_fast.reference._training_sample, operation for operation in the compute type (float32, float64 for
// float64 data), with the conventions of other codebases (per-channel time maps, one t0 per batch, a floor
// on the noise std).
//
// x_t needs t0 = u * max_p tau*(b, p) before any pixel can be sampled. V = sigma_r^2 + sigma_s^2 max(x0, 0),
// clamped below at min_std^2, and tau(V) are non-decreasing in x0 (in floating point too), so
// max_p tau* = tau(V(max x0)): a first pass reduces max x0 per image, no time map is stored. Images are
// processed in chunks of about kChunkBytes of x0, the max pass and then the sample pass of a chunk, so that
// the second read of x0 comes from the cache (one chunk of all images when t0 is shared by the batch).
// The sample pass runs one task per tile of kTile pixels of one image: per pixel the time map tau* =
// tau(max_c V) (per channel: tau(V_c)), gamma(tau*), tau, gamma(tau) and the bridge coefficients, then per
// channel y', x_t and the target; eps_T and eps' come from the tensors given or are drawn in the kernel
// (streams 2 (b C + c) and 2 (b C + c) + 1, as the Triton kernel).
// Bytes per element, float32, C = 3, noise drawn: x0 4 read; y', x_t, target 12 + tau 4/3 written = 17.33 B
// (+8 with both noise tensors).
#include "cpu_common.h"

namespace svnr {
namespace SVNR_CPU_NAMESPACE {
namespace {

constexpr int64_t kChunkBytes = int64_t(4) << 20;

template <typename T>
T variance_of(T x, T sigma_r2, T sigma_s2, T floor) {
  const T v = sigma_r2 + sigma_s2 * math::select(x < T(0), T(0), x);
  return math::select(v < floor, floor, v);
}

// Per-tile rows, kTile values each; x holds every channel of the tile.
template <typename T>
struct SampleRows {
  Buffer<T> x, v, tau_star, g_star, tau, g, y_scale, r, noise_scale, target_scale, eps_t, eps_p, y, x_t, target;
  Buffer<int> segment;
  Buffer<float> drawn;
  Buffer<const T*> x_rows;   // x0's rows of the tile, one per channel (into x0 itself where it allows)
  NormalScratch scratch;
  SampleRows(int64_t n, int64_t channels)
      : x(n * channels), v(n), tau_star(n), g_star(n), tau(n), g(n), y_scale(n), r(n), noise_scale(n),
        target_scale(n), eps_t(n), eps_p(n), y(n), x_t(n), target(n), segment(n), drawn(n), x_rows(channels),
        scratch(n) {}
};

template <typename T>
class Sampler {
 public:
  Sampler(const TrainingSampleArgs& a)
      : a_(a),
        table_(static_cast<const T*>(a.table.data)),
        last_(a.table.last),
        tiles_(ceil_div(a.pixels, kTile)),
        floor_(T(a.min_std * a.min_std)),
        times_(table_, last_, a.batch * a.pixels * (a.per_channel ? a.channels : 1)) {}

  void run(int threads) {
    const int64_t B = a_.batch, image_bytes = a_.channels * a_.pixels * 8;
    const int64_t chunk = a_.batch_t0 ? B : max64(1, kChunkBytes / max64(1, image_bytes));
    Buffer<T> tile_max(B * tiles_), t0(B);
    const int64_t elements = B * a_.channels * a_.pixels;
    for (void* image : {a_.y, a_.x_t, a_.target}) advise_huge_pages(image, elements * element_size(a_.x0.dtype));
    advise_huge_pages(a_.tau, B * (a_.per_channel ? a_.channels : 1) * a_.pixels * int64_t(sizeof(T)));
#pragma omp parallel num_threads(thread_count(threads, B * a_.channels * a_.pixels))
    {
      SampleRows<T> rows(kTile, a_.channels);
      for (int64_t first = 0; first < B; first += chunk) {
        const int64_t end = min64(B, first + chunk);
#pragma omp for schedule(static)
        for (int64_t task = first * tiles_; task < end * tiles_; ++task) tile_max[task] = largest_x0(task, rows);
#pragma omp single
        step_backs(first, end, tile_max.data(), t0.data());
#pragma omp for schedule(static)
        for (int64_t task = first * tiles_; task < end * tiles_; ++task) sample(task, t0[task / tiles_], rows);
      }
    }
  }

 private:
  T sigma_r2(int64_t b) const {
    const T s = static_cast<const T*>(a_.sigma_r)[b];
    return s * s;
  }
  T sigma_s2(int64_t b) const {
    const T s = static_cast<const T*>(a_.sigma_s)[b];
    return s * s;
  }

  T largest_x0(int64_t task, SampleRows<T>& rows) const {
    const int64_t b = task / tiles_, p = (task % tiles_) * kTile, n = min64(kTile, a_.pixels - p);
    T largest = T(-INFINITY);
    for (int64_t c = 0; c < a_.channels; ++c) {
      const T* x = read_row(a_.x0, b, c, p, n, rows.v.data());
#pragma omp simd reduction(max : largest)
      for (int64_t i = 0; i < n; ++i) largest = x[i] > largest ? x[i] : largest;
    }
    return largest;
  }

  // t0 of the images [first, end): u times the largest tau* of the image (of the batch when batch_t0, where
  // the chunk is the whole batch).
  void step_backs(int64_t first, int64_t end, const T* tile_max, T* t0) const {
    const T* u = static_cast<const T*>(a_.u);
    T batch_largest = 0;
    for (int64_t b = first; b < end; ++b) {
      T x = tile_max[b * tiles_];
      for (int64_t t = 1; t < tiles_; ++t) x = x > tile_max[b * tiles_ + t] ? x : tile_max[b * tiles_ + t];
      const T v = variance_of(x, sigma_r2(b), sigma_s2(b), floor_);
      int segment;
      times_.row(&v, 1, &segment, &t0[b]);
      batch_largest = t0[b] > batch_largest ? t0[b] : batch_largest;
    }
    for (int64_t b = first; b < end; ++b) t0[b] = u[b] * (a_.batch_t0 ? batch_largest : t0[b]);
  }

  // Steps 1-3 for one row of the time map: tau*, gamma(tau*), tau, gamma(tau) and the coefficients of y' and
  // x_t, from the variances in rows.v; writes tau (channel tc of the time map). Uncorrelated noise (the
  // ablation) is the bridge with r = 0: x0 + 0 * (y' - x0) + sqrt(gamma(tau)) eps' is x0 + sqrt(gamma(tau)) eps'
  // exactly.
  void coefficients(int64_t b, int64_t tc, int64_t p, int64_t n, T t0, SampleRows<T>& r) const {
    times_.row(r.v.data(), n, r.segment.data(), r.tau_star.data());
    gamma_row(r.tau_star.data(), n, table_, last_, r.g_star.data());
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T tau = r.tau_star[i] - t0;
      r.tau[i] = math::select(tau < T(0), T(0), tau);
    }
    T* tau_out = static_cast<T*>(a_.tau) + (b * (a_.per_channel ? a_.channels : 1) + tc) * a_.pixels + p;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) tau_out[i] = r.tau[i];
    gamma_row(r.tau.data(), n, table_, last_, r.g.data());
    const bool correlated = a_.correlated;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T g_star = r.g_star[i], g = r.g[i];
      const bool bridge = correlated && g_star > T(0), has_target = g > T(0);
      const T ratio = math::select(bridge, g / math::select(bridge, g_star, T(1)), T(0));
      const T rest = g * (T(1) - ratio);
      r.y_scale[i] = math::sqrt_of(g_star);
      r.r[i] = ratio;
      r.noise_scale[i] = math::sqrt_of(math::select(rest < T(0), T(0), rest));
      r.target_scale[i] = math::sqrt_of(math::select(has_target, g, T(1)));
    }
  }

  // The given noise's row, or one drawn into `scratch`.
  const T* noise(const Strided& given, std::uint64_t stream, int64_t b, int64_t c, int64_t p, int64_t n, T* scratch,
                 SampleRows<T>& r) const {
    if (given.data != nullptr) return read_row(given, b, c, p, n, scratch);
    draw_row(a_.seed, a_.offset, stream, p, n, r.scratch, r.drawn.data(), scratch);
    return scratch;
  }

  void sample(int64_t task, T t0, SampleRows<T>& r) const {
    const int64_t C = a_.channels, b = task / tiles_, p = (task % tiles_) * kTile, n = min64(kTile, a_.pixels - p);
    const T sr2 = sigma_r2(b), ss2 = sigma_s2(b);
    for (int64_t c = 0; c < C; ++c) r.x_rows[c] = read_row(a_.x0, b, c, p, n, r.x.data() + c * n);
    if (!a_.per_channel) {   // 1. the shared time map from the largest variance of each pixel
      const T* x = r.x_rows[0];
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) r.v[i] = x[i];
      for (int64_t c = 1; c < C; ++c) {
        x = r.x_rows[c];
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) r.v[i] = math::select(x[i] > r.v[i], x[i], r.v[i]);
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) r.v[i] = variance_of(r.v[i], sr2, ss2, floor_);
      coefficients(b, 0, p, n, t0, r);
    }
    for (int64_t c = 0; c < C; ++c) {
      const T* x = r.x_rows[c];
      if (a_.per_channel) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) r.v[i] = variance_of(x[i], sr2, ss2, floor_);
        coefficients(b, c, p, n, t0, r);
      }
      const std::uint64_t stream = std::uint64_t(2 * (b * C + c));
      const T* eps_t = noise(a_.eps_T, stream, b, c, p, n, r.eps_t.data(), r);
      const T* eps_p = noise(a_.eps_prime, stream + 1, b, c, p, n, r.eps_p.data(), r);
      const int dtype = a_.x0.dtype;
      const int64_t out = (b * C + c) * a_.pixels + p;
      T* ys = output_row(a_.y, dtype, out, r.y.data());
      T* x_ts = output_row(a_.x_t, dtype, out, r.x_t.data());
      T* targets = output_row(a_.target, dtype, out, r.target.data());
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const T x0 = x[i];
        const T y = x0 + r.y_scale[i] * eps_t[i];
        // 4. the Brownian bridge between x0 and y' (r = 0: independent noise, the ablation)
        const T x_t = x0 + r.r[i] * (y - x0) + r.noise_scale[i] * eps_p[i];
        // 5. the epsilon target; 0 where gamma(tau) = 0
        ys[i] = y;
        x_ts[i] = x_t;
        targets[i] = math::select(r.g[i] > T(0), (x_t - x0) / r.target_scale[i], T(0));
      }
      written_row(a_.y, dtype, out, ys, n);
      written_row(a_.x_t, dtype, out, x_ts, n);
      written_row(a_.target, dtype, out, targets, n);
    }
  }

  const TrainingSampleArgs& a_;
  const T* table_;
  int last_;
  int64_t tiles_;
  T floor_;
  TimeLookup<T> times_;
};

}  // namespace

void training_sample(const TrainingSampleArgs& args, int threads) {
  dispatch_compute(args.x0.dtype, [&](auto compute) { Sampler<decltype(compute)>(args).run(threads); });
}

}  // namespace SVNR_CPU_NAMESPACE
}  // namespace svnr
