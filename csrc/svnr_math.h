// Per-element math shared by the C++ (CPU) and CUDA kernels, so that both compute the same functions as
// svnr_fast.reference, written once: the schedule lookups (DESIGN.md §1.2), the in-kernel normals
// (Philox-4x32-10 + Box-Muller, the scheme of the Triton kernels) and GroupNorm + spatial FiLM (§1.6).
//
// Everything here is branch-free scalar code on purpose: the CPU kernels call it inside loops that the
// compiler vectorises (no libm calls in float, whose vector versions need -ffast-math), and the CUDA
// kernels call it per element. Floating-point choices go through `select`, a bit-mask blend on the host:
// GCC will not if-convert `c ? a : b` on floats under its default -ftrapping-math, which would leave every
// loop that clamps or converts 16-bit floats scalar. T is the compute type: float for float32/bfloat16/float16
// storage, double for float64. On the host every function has internal linkage (static): the CPU kernels
// are compiled once per instruction set, and no out-of-line copy built for one may stand in for another's.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SVNR_HD __host__ __device__ __forceinline__
#else
#define SVNR_HD static inline
#endif

namespace svnr {
namespace math {

SVNR_HD std::uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

SVNR_HD float bits_float(std::uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

SVNR_HD std::uint64_t double_bits(double x) {
#if defined(__CUDA_ARCH__)
  return static_cast<std::uint64_t>(__double_as_longlong(x));
#else
  std::uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

SVNR_HD double bits_double(std::uint64_t bits) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// c ? a : b
SVNR_HD std::uint32_t select(bool c, std::uint32_t a, std::uint32_t b) {
  const std::uint32_t mask = 0u - std::uint32_t(c);
  return (a & mask) | (b & ~mask);
}

SVNR_HD float select(bool c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  return bits_float(select(c, float_bits(a), float_bits(b)));
#endif
}

SVNR_HD double select(bool c, double a, double b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const std::uint64_t mask = 0u - std::uint64_t(c);
  return bits_double((double_bits(a) & mask) | (double_bits(b) & ~mask));
#endif
}

template <typename T>
SVNR_HD T clamp(T x, T low, T high) { return select(x > high, high, select(x < low, low, x)); }

// ---------------------------------------------------------------------------------------------------
// 16-bit storage <-> float, round to nearest even (what torch's .to() does). The host driver keeps
// bfloat16/float16 as raw bits; these are pure integer/float arithmetic so that they vectorise.
// ---------------------------------------------------------------------------------------------------

SVNR_HD float bf16_to_float(std::uint16_t bits) { return bits_float(std::uint32_t(bits) << 16); }

SVNR_HD std::uint16_t float_to_bf16(float x) {
  const std::uint32_t bits = float_bits(x);
  const std::uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  return std::uint16_t(select(nan, (bits >> 16) | 0x40u, rounded));   // keep NaNs NaN (quiet)
}

SVNR_HD float fp16_to_float(std::uint16_t h) {
  // Normal halves: exponent and mantissa shifted into a float's, rescaled by 2^-112 (the bias difference;
  // inf/NaN land on float inf/NaN). Subnormal halves m * 2^-24 are built exactly as (0.5 + m * 2^-24) - 0.5.
  const std::uint32_t w = std::uint32_t(h) << 16;
  const std::uint32_t sign = w & 0x80000000u;
  const std::uint32_t two_w = w + w;
  const float normal = bits_float((two_w >> 4) + (0xE0u << 23)) * bits_float(0x7800000u);  // * 2^-112
  const float subnormal = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_float(sign | float_bits(select(two_w < (1u << 27), subnormal, normal)));
}

SVNR_HD std::uint16_t float_to_fp16(float x) {
  // Scaling up then down by powers of two makes the float unit round at the half's precision (normal or
  // subnormal) and overflow to inf where the half would; the result's bits are then repacked.
  const std::uint32_t w = float_bits(x);
  const std::uint32_t shl1_w = w + w;
  const std::uint32_t sign = w & 0x80000000u;
  float base = (bits_float(w & 0x7FFFFFFFu) * bits_float(0x77800000u)) * bits_float(0x08800000u);  // * 2^112 * 2^-110
  std::uint32_t bias = shl1_w & 0xFF000000u;
  bias = select(bias < 0x71000000u, 0x71000000u, bias);
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const std::uint32_t bits = float_bits(base);
  const std::uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return std::uint16_t((sign >> 16) | select(shl1_w > 0xFF000000u, 0x7E00u, nonsign));
}

// ---------------------------------------------------------------------------------------------------
// exp and SiLU
// ---------------------------------------------------------------------------------------------------

// exp(x) for float within 2 ulp over the range the sigmoid needs, without a libm call: Cephes' range
// reduction x = n ln2 + r (|r| <= ln2/2) and degree-7 polynomial, 2^n built in the exponent bits.
// Arguments are clamped to [-87, 88] so that 2^n stays a normal float; the sigmoid saturates long before.
SVNR_HD float exp_float(float x) {
  x = clamp(x, -87.0f, 88.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;    // round to nearest via 1.5 * 2^23
  float r = x - n * 0.693359375f;                       // ln2 split in two: the first part is exact
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * (r * r) + r + 1.0f;
  return e * bits_float(std::uint32_t(int(n) + 127) << 23);
}

SVNR_HD float exp_of(float x) { return exp_float(x); }

SVNR_HD double exp_of(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

template <typename T>
SVNR_HD T sigmoid(T x) { return T(1) / (T(1) + exp_of(-x)); }

template <typename T>
SVNR_HD T silu(T x) { return x * sigmoid(x); }

// d silu / dx = s (1 + x (1 - s)), s = sigmoid(x): the form svnr_fast.reference writes out.
template <typename T>
SVNR_HD T silu_grad(T x) {
  const T s = sigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

template <bool Silu, typename T>
SVNR_HD T activate(T x) { return Silu ? silu(x) : x; }

template <bool Silu, typename T>
SVNR_HD T activate_grad(T x) { return Silu ? silu_grad(x) : T(1); }

// ---------------------------------------------------------------------------------------------------
// Table lookup: u in knot units, clamped to [0, K-1]; segment k = min(floor(u), K-2); frac = u - k.
// ---------------------------------------------------------------------------------------------------

template <typename T>
struct Knot {
  int k;
  T frac;
};

template <typename T>
SVNR_HD Knot<T> knot(T u, int K) {
  u = clamp(u, T(0), T(K - 1));
  int k = int(u);                      // u >= 0: truncation is floor
  k = k < K - 2 ? k : K - 2;           // u = K-1 uses the last segment with frac = 1
  return {k, u - T(k)};
}

// The reference's lerp, operation for operation: lo + frac * (hi - lo).
template <typename T>
SVNR_HD T lerp(T lo, T hi, T frac) { return lo + frac * (hi - lo); }

template <typename T>
struct ScaleShift {
  T scale, shift;
};

// One channel's scale and shift lerped at `knot`; knot row k of the channel sits at scale[k * stride] and
// shift[k * stride]: stride 1 in a channel's column of the transposed table, 2C in the (K, 2C) rows.
template <typename T>
SVNR_HD ScaleShift<T> film_at(const T* scale, const T* shift, std::int64_t stride, Knot<T> knot) {
  const std::int64_t low = knot.k * stride, high = low + stride;
  return {lerp(scale[low], scale[high], knot.frac), lerp(shift[low], shift[high], knot.frac)};
}

// ---------------------------------------------------------------------------------------------------
// GroupNorm + FiLM, forward and backward per element
// ---------------------------------------------------------------------------------------------------

template <typename T>
SVNR_HD T normalize(T x, T mean, T rstd) { return (x - mean) * rstd; }

// pre-activation: n * (1 + scale) + shift, with n = xhat * w + b the GroupNorm output
template <typename T>
SVNR_HD T film(T n, T scale, T shift) { return n * (T(1) + scale) + shift; }

// Per-element gradients of out = act(film(xhat * w + b, scale, shift)) given dout:
// dpre = dout * act'(pre) (= d shift), dscale = dpre * n, dn = dpre * (1 + scale) (= d b; d w = dn * xhat).
template <typename T>
struct FilmGrad {
  T dpre;
  T dscale;
  T dn;
};

template <bool Silu, typename T>
SVNR_HD FilmGrad<T> film_grad(T dout, T xhat, T w, T b, T scale, T shift) {
  const T n = xhat * w + b;
  const T dpre = dout * activate_grad<Silu>(film(n, scale, shift));
  return {dpre, dpre * n, dpre * (T(1) + scale)};
}

// a * b rounded once, never contracted with a following add into an FMA (nvcc contracts by default).
SVNR_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

SVNR_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// GroupNorm input gradient: rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)), dxhat = dn * w.
// dxhat is rounded exactly as the reduction pass rounded it: where the two means cancel it (one-element
// groups, where rstd = 1/sqrt(eps) amplifies any difference), an FMA's unrounded product would leave a
// residue of one rounding error times rstd instead of 0.
template <typename T>
SVNR_HD T groupnorm_grad_input(T dn, T w, T xhat, T rstd, T mean_dxhat, T mean_dxhat_xhat) {
  return rstd * (mul_rn(dn, w) - mean_dxhat - mul_rn(xhat, mean_dxhat_xhat));
}

// ---------------------------------------------------------------------------------------------------
// Statistics: count, mean and sum of squared deviations, merged pairwise (Chan et al.)
// ---------------------------------------------------------------------------------------------------

template <typename T>
struct Moments {
  T count;
  T mean;
  T m2;
};

// From sums of d = x - shift and d^2 over `count` values; exact up to rounding when shift is one of the
// values (then |d| is of the order of the spread, so the subtraction below loses nothing that matters).
template <typename T>
SVNR_HD Moments<T> moments_from_shifted_sums(T count, T shift, T sum, T sum_sq) {
  const T m2 = sum_sq - sum * sum / count;
  return {count, shift + sum / count, select(m2 > T(0), m2, T(0))};
}

template <typename T>
SVNR_HD Moments<T> merge(Moments<T> a, Moments<T> b) {
  const T count = a.count + b.count;
  if (count == T(0)) return a;
  const T delta = b.mean - a.mean;
  const T weight = b.count / count;
  return {count, a.mean + delta * weight, a.m2 + b.m2 + delta * delta * a.count * weight};
}

template <typename T>
SVNR_HD T inverse_std(T m2, T count, T eps) {
  const T var = m2 / count;
#if defined(__CUDA_ARCH__)
  return T(1) / sqrt(var + eps);
#else
  return T(1) / std::sqrt(var + eps);
#endif
}

// ---------------------------------------------------------------------------------------------------
// Schedule lookups (DESIGN.md §1.2) on a variance table of last + 1 entries, in the compute type
// ---------------------------------------------------------------------------------------------------

// gamma(tau) as reference._gamma: tau clamped to [0, last], segment k = min(floor(tau), last - 1).
template <typename T>
SVNR_HD T gamma_at(T tau, const T* table, int last) {
  tau = clamp(tau, T(0), T(last));
  int k = int(tau);                    // tau >= 0: truncation is floor
  k = k < last - 1 ? k : last - 1;
  return lerp(table[k], table[k + 1], tau - T(k));
}

// One step of the branch-free binary search for the last k in [0, last - 1] with table[k] <= v (0 when
// none is): k = min(k + step, last - 1) where that entry is <= v. Steps top, top / 2, ..., 1 with top the
// largest power of two <= last - 1 (search_top) find it from k = 0.
template <typename T>
SVNR_HD int search_step(int k, int step, T v, const T* table, int last) {
  int candidate = k + step;
  candidate = candidate < last - 1 ? candidate : last - 1;
  return table[candidate] <= v ? candidate : k;
}

SVNR_HD int search_top(int last) {
  int top = 1;
  while (2 * top <= last - 1) top *= 2;
  return last > 1 ? top : 0;
}

// tau(v) on segment k as reference._time_from_variance: k + (v - g_k) / (g_k+1 - g_k), clamped to [0, last].
template <typename T>
SVNR_HD T time_on_segment(T v, int k, const T* table, int last) {
  const T lo = table[k], hi = table[k + 1];
  return clamp(T(k) + (v - lo) / (hi - lo), T(0), T(last));
}

// ---------------------------------------------------------------------------------------------------
// Counter-based normals: Philox-4x32-10 and Box-Muller, as kernels/_triton_common.py `normals`
// ---------------------------------------------------------------------------------------------------

struct Philox {
  std::uint32_t x0, x1, x2, x3;
};

// Philox-4x32-10 (Salmon et al., Random123) of counter (c0, c1, c2, c3) under key (k0, k1).
SVNR_HD Philox philox4x32_10(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3,
                             std::uint32_t k0, std::uint32_t k1) {
  // unrolled, so that a loop over counters around this call is the innermost loop, which GCC vectorises
#if defined(__CUDA_ARCH__)
#pragma unroll
#elif defined(__GNUC__) && !defined(__clang__)
#pragma GCC unroll 10
#elif defined(__clang__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = std::uint64_t(0xD2511F53u) * c0, p1 = std::uint64_t(0xCD9E8D57u) * c2;
    const std::uint32_t hi0 = std::uint32_t(p0 >> 32), lo0 = std::uint32_t(p0);
    const std::uint32_t hi1 = std::uint32_t(p1 >> 32), lo1 = std::uint32_t(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// A uint32 as a float in [0, 1), as Triton's uint_to_uniform_float.
SVNR_HD float uniform(std::uint32_t bits) {
  const std::int32_t x = std::int32_t(bits);
  return float(x ^ (x >> 31)) * 4.6566127342e-10f;   // x < 0 -> -x - 1
}

// ln(x) for normal float x > 0 within 2 ulp: Cephes' logf (x = m 2^e, m in [sqrt(1/2), sqrt(2)), degree-9
// polynomial), without a libm call.
SVNR_HD float log_float(float x) {
  const std::uint32_t bits = float_bits(x);
  float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);   // in [0.5, 1)
  const bool low = m < 0.70710678118654752f;
  const float e = float(int(bits >> 23) - 126 - int(low));
  m = select(low, m + m, m) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z + e * -2.12194440e-4f - 0.5f * z;
  return (m + y) + e * 0.693359375f;
}

// (sin 2 pi u, cos 2 pi u) for u in [0, 1]: reduction to [-pi/4, pi/4] and Cephes' sinf/cosf polynomials,
// as the Triton kernels' sincos_2pi.
struct SinCos {
  float sin, cos;
};

SVNR_HD SinCos sincos_2pi(float u) {
  const float q = float(int(u * 4.0f + 0.5f));   // u >= 0: truncation is floor
  const float x = (u - q * 0.25f) * 6.283185307179586f;
  const float x2 = x * x;
  const float sin = x + x * x2 * ((-1.9515295891e-4f * x2 + 8.3321608736e-3f) * x2 - 1.6666654611e-1f);
  const float cos = 1.0f - 0.5f * x2 +
                    x2 * x2 * ((2.443315711809948e-5f * x2 - 1.388731625493765e-3f) * x2 + 4.166664568298827e-2f);
  const int quadrant = int(q) & 3;   // 2 pi u = quadrant * pi / 2 + x
  const bool swap = quadrant & 1;
  const float s = select(swap, cos, sin), c = select(swap, sin, cos);
  return {select(quadrant >= 2, -s, s), select(quadrant == 1 || quadrant == 2, -c, c)};
}

SVNR_HD float sqrt_of(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

SVNR_HD double sqrt_of(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// Two independent N(0, 1) draws from two random uint32 (|z| < 5.7: u is kept >= 1e-7 as in tl.randn).
struct NormalPair {
  float a, b;
};

SVNR_HD NormalPair box_muller(std::uint32_t bits_a, std::uint32_t bits_b) {
  const float u = uniform(bits_a);
  const float radius = sqrt_of(-2.0f * log_float(select(u < 1.0e-7f, 1.0e-7f, u)));
  const SinCos sc = sincos_2pi(uniform(bits_b));
  return {radius * sc.cos, radius * sc.sin};
}

}  // namespace math
}  // namespace svnr
