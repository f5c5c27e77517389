// Unit test of csrc/svnr_math.h, the per-element math the CPU and CUDA kernels share. Built by CMake with
// -DSVNR_FAST_BUILD_TESTS=ON and run by ctest; exits non-zero and names every failed check.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "svnr_math.h"

namespace math = svnr::math;

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got = 0, double want = 0) {
  if (!ok) {
    ++failures;
    std::printf("FAILED: %s (got %.9g, want %.9g)\n", what, got, want);
  }
}

void expect_near(double got, double want, double tolerance, const char* what) {
  expect(std::fabs(got - want) <= tolerance, what, got, want);
}

// IEEE half decoded from its fields, independently of the header's bit tricks.
double half_value(std::uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  const double s = sign ? -1.0 : 1.0;
  if (exponent == 0x1F) return mantissa ? std::nan("") : s * INFINITY;
  if (exponent == 0) return s * std::ldexp(mantissa, -24);
  return s * std::ldexp(1024 + mantissa, exponent - 25);
}

// Round to nearest even among the representable neighbours of x (lo <= x <= lo + 1 in bit order).
template <typename Decode>
std::uint32_t nearest_even(double x, std::uint32_t lo, Decode decode) {
  const double below = decode(lo), above = decode(lo + 1);
  const double d_below = x - below, d_above = above - x;
  if (d_below < d_above) return lo;
  if (d_above < d_below) return lo + 1;
  return (lo & 1u) ? lo + 1 : lo;
}

void test_bfloat16() {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const float x = math::bf16_to_float(std::uint16_t(bits));
    expect(x == math::bits_float(bits << 16) || std::isnan(x), "bf16_to_float is a 16-bit shift", x);
    const std::uint16_t back = math::float_to_bf16(x);
    expect(std::isnan(x) ? std::isnan(math::bf16_to_float(back)) : back == bits, "bf16 round trip", back, bits);
  }
  std::mt19937 rng(1);
  std::uniform_int_distribution<std::uint32_t> any_bits(0, 0x7F7FFFFFu);   // finite, positive
  // IEEE rounding treats the inf pattern as the next power of two: beyond the halfway point, overflow
  auto decode = [](std::uint32_t b) {
    return b == 0x7F80u ? std::ldexp(1.0, 128) : double(math::bf16_to_float(std::uint16_t(b)));
  };
  for (int i = 0; i < 200000; ++i) {
    const std::uint32_t bits = any_bits(rng) | (i % 2 ? 0x80000000u : 0u);
    const float x = math::bits_float(bits);
    const std::uint32_t magnitude = nearest_even(std::fabs(double(x)), (bits & 0x7FFFFFFFu) >> 16, decode);
    const std::uint16_t want = std::uint16_t(magnitude | ((bits >> 16) & 0x8000u));
    expect(math::float_to_bf16(x) == want, "float_to_bf16 rounds to nearest even", math::float_to_bf16(x), want);
  }
  // an exact tie rounds to the even neighbour
  expect(math::float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3F80u, "bf16 tie to even (down)");
  expect(math::float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3F82u, "bf16 tie to even (up)");
}

void test_float16() {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const double want = half_value(std::uint16_t(bits));
    const float x = math::fp16_to_float(std::uint16_t(bits));
    expect(std::isnan(want) ? std::isnan(x) : double(x) == want, "fp16_to_float decodes", x, want);
    const std::uint16_t back = math::float_to_fp16(x);
    expect(std::isnan(want) ? std::isnan(half_value(back)) : back == bits, "fp16 round trip", back, bits);
  }
  std::mt19937 rng(2);
  std::uniform_real_distribution<double> log_magnitude(-30.0, 17.0);   // subnormal halves to overflow
  auto decode = [](std::uint32_t b) { return b == 0x7C00u ? 65536.0 : half_value(std::uint16_t(b)); };
  for (int i = 0; i < 200000; ++i) {
    const float x = float(std::exp2(log_magnitude(rng)));
    std::uint32_t lo = 0, hi = 0x7BFFu;   // binary search: the largest finite half <= x
    while (lo < hi) {
      const std::uint32_t mid = (lo + hi + 1) / 2;
      if (half_value(std::uint16_t(mid)) <= x) lo = mid; else hi = mid - 1;
    }
    const std::uint32_t want = nearest_even(double(x), lo, decode);
    expect(math::float_to_fp16(x) == want, "float_to_fp16 rounds to nearest even", math::float_to_fp16(x), want);
    expect(math::float_to_fp16(-x) == (want | 0x8000u), "float_to_fp16 keeps the sign");
  }
  expect(math::float_to_fp16(1e6f) == 0x7C00u, "fp16 overflow is inf");
  expect(math::float_to_fp16(std::ldexp(1.0f, -26)) == 0u, "fp16 underflow (a tie with 0) is 0");
}

void test_exp_and_silu() {
  double worst = 0;
  for (double x = -87.0; x <= 88.0; x += 0.000997) {
    const double want = std::exp(double(float(x)));
    worst = std::fmax(worst, std::fabs(math::exp_float(float(x)) - want) / want);
  }
  expect(worst < 2.5e-7, "exp_float is within 2 ulp", worst, 2.5e-7);
  expect(math::exp_float(-1000.0f) > 0.0f && math::exp_float(-1000.0f) < 1e-37f, "exp_float saturates low");
  expect(std::isfinite(math::exp_float(1000.0f)), "exp_float saturates high to a finite value");

  for (double x = -30.0; x <= 30.0; x += 0.01) {
    const double s = 1.0 / (1.0 + std::exp(-x));
    expect_near(math::silu(float(x)), float(x) * (1.0 / (1.0 + std::exp(-double(float(x))))),
                1e-6 * std::fmax(1.0, std::fabs(x)), "silu(float)");
    expect_near(math::silu(x), x * s, 1e-15 * std::fmax(1.0, std::fabs(x)), "silu(double)");
    const double h = 1e-6;
    expect_near(math::silu_grad(x), (math::silu(x + h) - math::silu(x - h)) / (2 * h), 1e-8, "silu_grad(double)");
    expect_near(math::silu_grad(float(x)), math::silu_grad(double(float(x))), 1e-6, "silu_grad(float)");
  }
  expect(math::silu(-200.0f) == 0.0f || std::fabs(math::silu(-200.0f)) < 1e-30f, "silu saturates at -inf");
  expect(math::silu(200.0f) == 200.0f, "silu is the identity at +inf");
  expect(math::activate<false>(3.5f) == 3.5f && math::activate_grad<false>(3.5f) == 1.0f, "identity activation");
}

void test_knot_and_lerp() {
  const int K = 9;
  struct Case {
    double u;
    int k;
    double frac;
  };
  const Case cases[] = {{-3.0, 0, 0.0}, {0.0, 0, 0.0}, {0.25, 0, 0.25}, {3.0, 3, 0.0}, {7.5, 7, 0.5},
                        {8.0, 7, 1.0},  {8.5, 7, 1.0}, {1e9, 7, 1.0}};
  for (const Case& c : cases) {
    const math::Knot<double> kd = math::knot(c.u, K);
    const math::Knot<float> kf = math::knot(float(c.u), K);
    expect(kd.k == c.k && kd.frac == c.frac, "knot(double)", kd.k + kd.frac, c.k + c.frac);
    expect(kf.k == c.k && kf.frac == float(c.frac), "knot(float)", kf.k + kf.frac, c.k + c.frac);
  }
  expect(math::knot(1.0f, 2).k == 0 && math::knot(1.0f, 2).frac == 1.0f, "knot with K = 2");
  expect(math::lerp(2.0, 5.0, 0.0) == 2.0 && math::lerp(2.0, 5.0, 1.0) == 5.0, "lerp hits the knots");
  expect_near(math::lerp(2.0, 5.0, 0.25), 2.75, 1e-15, "lerp between knots");
  expect(math::clamp(-0.0f, 0.0f, 1.0f) == 0.0f && math::clamp(2.0, 0.0, 1.0) == 1.0, "clamp");
  expect(math::select(true, 1.5f, 2.5f) == 1.5f && math::select(false, 1.5, 2.5) == 2.5, "select");
}

void test_film_gradients() {
  // every partial derivative of act(film(xhat * w + b, scale, shift)) against central differences
  const double h = 1e-6;
  const double xhat = 0.7, w = -1.3, b = 0.4, scale = 0.25, shift = -0.6, dout = 1.7;
  auto f = [&](double x_, double w_, double b_, double s_, double t_) {
    return math::silu(math::film(x_ * w_ + b_, s_, t_));
  };
  const math::FilmGrad<double> g = math::film_grad<true>(dout, xhat, w, b, scale, shift);
  const double d_shift = (f(xhat, w, b, scale, shift + h) - f(xhat, w, b, scale, shift - h)) / (2 * h);
  const double d_scale = (f(xhat, w, b, scale + h, shift) - f(xhat, w, b, scale - h, shift)) / (2 * h);
  const double d_b = (f(xhat, w, b + h, scale, shift) - f(xhat, w, b - h, scale, shift)) / (2 * h);
  expect_near(g.dpre, dout * d_shift, 1e-8, "film_grad dpre = d shift");
  expect_near(g.dscale, dout * d_scale, 1e-8, "film_grad dscale");
  expect_near(g.dn, dout * d_b, 1e-8, "film_grad dn = d b");
  const math::FilmGrad<double> linear = math::film_grad<false>(dout, xhat, w, b, scale, shift);
  expect_near(linear.dpre, dout, 0, "identity film_grad dpre");
  expect_near(linear.dn, dout * (1 + scale), 1e-15, "identity film_grad dn");
}

void test_groupnorm_backward_and_moments() {
  // L(x) = sum_i g_i * w * xhat_i(x): its gradient is groupnorm_grad_input with dn = g
  const std::vector<double> x = {0.3, -1.2, 2.5, 0.9, -0.4, 1.1};
  const std::vector<double> g = {0.5, -0.7, 0.2, 1.3, -0.1, 0.8};
  const double w = 1.7, eps = 1e-5;
  const double n = double(x.size());
  auto stats = [&](const std::vector<double>& v, double& mean, double& rstd) {
    mean = 0;
    for (double e : v) mean += e / n;
    double var = 0;
    for (double e : v) var += (e - mean) * (e - mean) / n;
    rstd = 1 / std::sqrt(var + eps);
  };
  auto loss = [&](const std::vector<double>& v) {
    double mean, rstd, total = 0;
    stats(v, mean, rstd);
    for (std::size_t i = 0; i < v.size(); ++i) total += g[i] * w * math::normalize(v[i], mean, rstd);
    return total;
  };
  double mean, rstd;
  stats(x, mean, rstd);
  double m1 = 0, m2 = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    m1 += g[i] * w / n;
    m2 += g[i] * w * math::normalize(x[i], mean, rstd) / n;
  }
  for (std::size_t j = 0; j < x.size(); ++j) {
    std::vector<double> up = x, down = x;
    up[j] += 1e-6;
    down[j] -= 1e-6;
    const double numeric = (loss(up) - loss(down)) / 2e-6;
    const double formula = math::groupnorm_grad_input(g[j], w, math::normalize(x[j], mean, rstd), rstd, m1, m2);
    expect_near(formula, numeric, 1e-7, "groupnorm_grad_input");
  }

  // shifted sums of two halves, merged, give the two-pass mean and M2
  math::Moments<double> merged{0, 0, 0};
  for (std::size_t half = 0; half < 2; ++half) {
    const double shift = x[3 * half];
    double sum = 0, sum_sq = 0;
    for (std::size_t i = 3 * half; i < 3 * half + 3; ++i) {
      sum += x[i] - shift;
      sum_sq += (x[i] - shift) * (x[i] - shift);
    }
    merged = math::merge(merged, math::moments_from_shifted_sums(3.0, shift, sum, sum_sq));
  }
  double m2_direct = 0;
  for (double e : x) m2_direct += (e - mean) * (e - mean);
  expect_near(merged.count, n, 0, "merged count");
  expect_near(merged.mean, mean, 1e-15, "merged mean");
  expect_near(merged.m2, m2_direct, 1e-13, "merged M2");
  expect_near(math::inverse_std(merged.m2, merged.count, eps), rstd, 1e-12, "inverse_std");
  // a constant group has M2 = 0 exactly (never negative)
  const math::Moments<float> constant = math::moments_from_shifted_sums(4.0f, 3.0f, 0.0f, 0.0f);
  expect(constant.m2 == 0.0f && constant.mean == 3.0f, "constant group");
}

void test_schedule_lookups() {
  const float table[] = {0.0f, 0.5f, 0.75f, 2.0f, 2.5f};   // last = 4
  const int last = 4;
  expect(math::gamma_at(0.0f, table, last) == 0.0f, "gamma(0) = g[0]");
  expect(math::gamma_at(4.0f, table, last) == 2.5f, "gamma(T) = g[T] (last segment, frac 1)");
  expect(math::gamma_at(9.0f, table, last) == 2.5f && math::gamma_at(-1.0f, table, last) == 0.0f, "gamma clamps");
  expect_near(math::gamma_at(2.5f, table, last), 1.375, 1e-7, "gamma lerps");
  expect(math::search_top(last) == 2 && math::search_top(2) == 1 && math::search_top(1) == 0 &&
             math::search_top(1001) == 512 && math::search_top(1000) == 512,
         "search_top: largest power of two <= last - 1");
  // the search finds the last k <= last - 1 with g[k] <= v, and time_on_segment inverts gamma
  for (float v : {-1.0f, 0.0f, 0.1f, 0.5f, 0.6f, 0.75f, 1.9f, 2.0f, 2.4f, 2.5f, 7.0f}) {
    int k = 0;
    for (int step = math::search_top(last); step > 0; step >>= 1) k = math::search_step(k, step, v, table, last);
    int want = 0;
    for (int j = 0; j <= last - 1; ++j)
      if (table[j] <= v) want = j;
    expect(k == want, "binary search segment", k, want);
    const float tau = math::time_on_segment(v, k, table, last);
    if (v >= 0.0f && v <= 2.5f) expect_near(math::gamma_at(tau, table, last), v, 1e-6, "gamma(tau(v)) = v");
    if (v > 2.5f) expect(tau == 4.0f, "tau above the table is T");
  }
}

void test_normals() {
  // Random123's known-answer vectors of philox4x32_10
  const math::Philox zero = math::philox4x32_10(0, 0, 0, 0, 0, 0);
  expect(zero.x0 == 0x6627e8d5u && zero.x1 == 0xe169c58du && zero.x2 == 0xbc57ac4cu && zero.x3 == 0x9b00dbd8u,
         "philox4x32_10(0; 0)");
  const math::Philox ones = math::philox4x32_10(~0u, ~0u, ~0u, ~0u, ~0u, ~0u);
  expect(ones.x0 == 0x408f276du && ones.x1 == 0x41c83b0eu && ones.x2 == 0xa20bc7c6u && ones.x3 == 0x6d5451fdu,
         "philox4x32_10(ff..; ff..)");
  const math::Philox pi = math::philox4x32_10(0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u,
                                              0x299f31d0u);
  expect(pi.x0 == 0xd16cfe09u && pi.x1 == 0x94fdccebu && pi.x2 == 0x5001e420u && pi.x3 == 0x24126ea1u,
         "philox4x32_10(pi digits)");

  expect(math::uniform(0) == 0.0f && math::uniform(0xFFFFFFFFu) == 0.0f, "uniform(0) = uniform(-1) = 0");
  expect(math::uniform(0x7FFFFFFFu) < 1.0f && math::uniform(0x80000000u) < 1.0f, "uniform < 1");
  double worst_log = 0;
  for (float x = 1e-7f; x < 1.0f; x *= 1.0137f) {
    const double err = std::fabs(math::log_float(x) - std::log(double(x))) / std::fabs(std::log(double(x)));
    worst_log = err > worst_log ? err : worst_log;
  }
  expect(worst_log < 3e-7, "log_float within 2.5 ulp on [1e-7, 1)", worst_log, 3e-7);
  double worst_trig = 0;
  for (int i = 0; i <= 4096; ++i) {
    const float u = float(i) / 4096.0f;
    const math::SinCos sc = math::sincos_2pi(u);
    const double angle = 2 * M_PI * double(u);
    worst_trig = std::fmax(worst_trig, std::fmax(std::fabs(sc.sin - std::sin(angle)), std::fabs(sc.cos - std::cos(angle))));
  }
  expect(worst_trig < 5e-7, "sincos_2pi within 5e-7 on [0, 1]", worst_trig, 5e-7);
  const math::NormalPair smallest = math::box_muller(0, 0);   // u = 0 is kept at 1e-7
  expect_near(smallest.a, std::sqrt(-2 * std::log(1e-7)), 1e-5, "box_muller radius at u = 1e-7");
}

}  // namespace

int main() {
  test_bfloat16();
  test_float16();
  test_exp_and_silu();
  test_knot_and_lerp();
  test_film_gradients();
  test_groupnorm_backward_and_moments();
  test_schedule_lookups();
  test_normals();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("svnr_math.h: all checks passed\n");
  return 0;
}
