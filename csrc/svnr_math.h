// Per-element math of the fused GroupNorm + spatial FiLM op (DESIGN.md §1.6), shared by the C++ (CPU)
// and CUDA kernels so that both compute the same function as svnr_fast.reference, written once.
//
// Everything here is branch-free scalar code on purpose: the CPU driver calls it inside loops that the
// compiler vectorises (no libm calls in float, whose vector versions need -ffast-math), and the CUDA
// kernels call it per element. Floating-point choices go through `select`, a bit-mask blend on the host:
// GCC will not if-convert `c ? a : b` on floats under its default -ftrapping-math, which would leave every
// loop that clamps or converts 16-bit floats scalar. T is the compute type: float for float32/bfloat16/float16 storage,
// double for float64.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SVNR_HD __host__ __device__ __forceinline__
#else
#define SVNR_HD inline
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

}  // namespace math
}  // namespace svnr
