// The SVNR reverse step on the CPU (DESIGN.md §1.5): the same function as
// svnr_fast.reference._reverse_step, operation for operation in the compute type (float32, float64 for float64
// data), so that a result agrees with the reference to a few ulp and exactly finished pixels (gamma(tau) = 0)
// are the same pixels.
//
// One task per tile of kTile pixels of one image: the per-pixel coefficients (both table lookups, the
// square roots, the posterior variance) are computed once per tile for a shared time map, once per channel
// for a per-channel one; then each channel's x, eps_hat and z (given, or drawn in the kernel: Philox per four
// pixels, stream b * C + c, as the Triton kernel) are loaded, updated and stored in vectorised row loops.
// Bytes per element, float32, C = 3, z drawn: x 4 + eps_hat 4 + tau 4/3 read, x_new 4 + s 4/3 written =
// 14.67 B (+4 with a z tensor, +4 with x0_hat).
#include "cpu_common.h"

namespace svnr {
namespace SVNR_CPU_NAMESPACE {
namespace {

// Per-tile rows, kTile values each.
template <typename T>
struct StepRows {
  Buffer<T> tau, s, gt, gs, sqrt_gt, eps_scale, z_scale, x, eps, z, x0_hat, x_new;
  Buffer<float> drawn;
  NormalScratch scratch;
  explicit StepRows(int64_t n)
      : tau(n), s(n), gt(n), gs(n), sqrt_gt(n), eps_scale(n), z_scale(n), x(n), eps(n), z(n), x0_hat(n),
        x_new(n), drawn(n), scratch(n) {}
};

// Steps 2-4 on one row: x0_hat, x_new; Clamp and Noise (a z term) are template arguments so that the loop
// has no branches and vectorises.
template <bool Clamp, bool Noise, typename T>
void update(int64_t n, const T* x, const T* eps, const T* z, const StepRows<T>& r, T low, T high, T* x0_hat_out,
            T* x_new_out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    // 3. the network's estimate of the clean image
    T x0_hat = x[i] - r.sqrt_gt[i] * eps[i];
    if (Clamp) x0_hat = math::clamp(x0_hat, low, high);
    T x_new = x0_hat + r.eps_scale[i] * eps[i];
    if (Noise) x_new = x_new + r.z_scale[i] * z[i];
    // 2. finished pixels (gamma(tau) = 0) stay as they are
    const bool finished = r.gt[i] == T(0);
    x_new_out[i] = math::select(finished, x[i], x_new);
    x0_hat_out[i] = math::select(finished, x[i], x0_hat);
  }
}

template <typename T>
void step(const ReverseStepArgs& a, int threads) {
  const T* table = static_cast<const T*>(a.table.data);
  const int last = a.table.last;
  const T* delta = static_cast<const T*>(a.delta);
  const int64_t C = a.channels, HW = a.pixels, tiles = ceil_div(HW, kTile);
  const int64_t time_channels = a.per_channel ? C : 1;
  // Python scalars, rounded to the compute type as torch rounds them
  const T eta2 = T(a.eta * a.eta), low = T(a.clamp_min), high = T(a.clamp_max);
  const bool noise = a.eta > 0, drawn = noise && a.z.data == nullptr;
  auto update_row = noise ? (a.clamp ? update<true, true, T> : update<false, true, T>)
                          : (a.clamp ? update<true, false, T> : update<false, false, T>);
  const int64_t elements = a.batch * C * HW;
  advise_huge_pages(a.x_new, elements * element_size(a.x.dtype));
  advise_huge_pages(a.x0_hat, elements * element_size(a.x.dtype));
  advise_huge_pages(a.tau_new, a.batch * time_channels * HW * element_size(a.tau.dtype));

#pragma omp parallel num_threads(thread_count(threads, a.batch * C * HW))
  {
    StepRows<T> r(kTile);
#pragma omp for schedule(static)
    for (int64_t task = 0; task < a.batch * tiles; ++task) {
      const int64_t b = task / tiles, p = (task % tiles) * kTile, n = min64(kTile, HW - p);
      for (int64_t c = 0; c < C; ++c) {
        if (c < time_channels) {   // 1. s, gamma(tau), gamma(s) and the coefficients of this time map row
          const T* tau = read_row(a.tau, b, c, p, n, r.tau.data());
          const T d = delta[b];
          const int64_t out = (b * time_channels + c) * HW + p;
          T* s = output_row(a.tau_new, a.tau.dtype, out, r.s.data());
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const T next = tau[i] - d;
            s[i] = math::select(next < T(0), T(0), next);
          }
          written_row(a.tau_new, a.tau.dtype, out, s, n);
          gamma_row(tau, n, table, last, r.gt.data());
          gamma_row(s, n, table, last, r.gs.data());
#pragma omp simd
          for (int64_t i = 0; i < n; ++i) {
            const T gt = r.gt[i], gs = r.gs[i];
            // 4. posterior variance scaled by eta^2; the rest of gamma(s) is carried by eps_hat
            const T sig2 = eta2 * gs * (T(1) - gs / math::select(gt > T(0), gt, T(1)));
            const T rest = gs - sig2;
            r.sqrt_gt[i] = math::sqrt_of(gt);
            r.eps_scale[i] = math::sqrt_of(math::select(rest < T(0), T(0), rest));
            r.z_scale[i] = math::sqrt_of(math::select(sig2 < T(0), T(0), sig2));
          }
        }
        const T* x = read_row(a.x, b, c, p, n, r.x.data());
        const T* eps = read_row(a.eps_hat, b, c, p, n, r.eps.data());
        const T* z = r.z.data();
        if (drawn) {
          draw_row(a.seed, a.offset, std::uint64_t(b * C + c), p, n, r.scratch, r.drawn.data(), r.z.data());
        } else if (noise) {
          z = read_row(a.z, b, c, p, n, r.z.data());
        }
        const int64_t out = (b * C + c) * HW + p;
        T* x_new = output_row(a.x_new, a.x.dtype, out, r.x_new.data());
        T* x0_hat = a.x0_hat != nullptr ? output_row(a.x0_hat, a.x.dtype, out, r.x0_hat.data()) : r.x0_hat.data();
        update_row(n, x, eps, z, r, low, high, x0_hat, x_new);
        written_row(a.x_new, a.x.dtype, out, x_new, n);
        if (a.x0_hat != nullptr) written_row(a.x0_hat, a.x.dtype, out, x0_hat, n);
      }
    }
  }
}

}  // namespace

void reverse_step(const ReverseStepArgs& args, int threads) {
  dispatch_compute(args.x.dtype, [&](auto compute) { step<decltype(compute)>(args, threads); });
}

}  // namespace SVNR_CPU_NAMESPACE
}  // namespace svnr
