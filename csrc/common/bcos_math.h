// Scalar math of the B-cos layer, shared by the CPU kernels and (later) the
// CUDA kernels.  Plain C++17, no torch: the C++ unit test
// (csrc/tests/test_bcos_math.cpp) exercises exactly these functions.
//
// Conventions
//   l      : the linear response (after MaxOut), "lin_max"
//   n      : the patch norm, sqrt(sum of squares over the patch + 1e-6)
//   bm1    : b - 1
//   scale  : the output divisor (B-cos v1 "scale"; 1 for v2)
//   e      : kCosEps = 1e-6, added to |cos| before the power
//
// Forward, per element (three modes, see scale_mode()):
//   one     (b == 1, b a python number) : out = l / scale
//   two     (b == 2, b a python number) : out = ((|l| / n) * l) / scale
//   general                             : out = (pow(|l / n| + e, b - 1) * l) / scale
// The "two" expression keeps the operation order of the original B-cos v2
// code, so fp32 results match it bit for bit.
//
// Derivatives, with c = |l| / n, t = c + e, s = t^(b-1) (computed with
// 1 / n and 1 / scale, see below):
//   d out / d l : one: 1/scale; two: (detach ? 1 : 2) * c / scale;
//                 general: detach ? s / scale : s * (1 + (b-1) * c / t) / scale
//   d out / d n : zero when detach or one; two: -c * (l / n) / scale;
//                 general: -(b-1) * s * (c / t) * (l / n) / scale
//   d out / d b : general only (also when detach): l * s * ln(t) / scale
//
// Float powers are computed as exp((b-1) * log(t)) with the small
// polynomial log/exp below: they are branch-free (so the compiler
// vectorises the CPU loops), accurate to a few ulp (pow: ~2e-6 relative at
// t = 1e-6), and the same formula on every backend (the last bits may differ
// where a compiler fuses multiply-adds).  t >= 1e-6 > 0 always, so the log is
// well defined; NaN and +inf propagate.  Double uses the libm functions.
#ifndef BCOS_KERNELS_COMMON_BCOS_MATH_H_
#define BCOS_KERNELS_COMMON_BCOS_MATH_H_

#if defined(__CUDACC__)
#define BCOS_HD __host__ __device__
#else
#define BCOS_HD
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace bcos_math {

// Epsilon added to the sum of squares of a patch before the square root.
constexpr double kNormEps = 1e-6;
// Epsilon added to |cos| before raising it to the power b - 1.
constexpr double kCosEps = 1e-6;

// The three forward modes of the dynamic scale.
enum ScaleMode : int { kModeOne = 0, kModeTwo = 1, kModeGeneral = 2 };

// b given as a tensor (learnable B) always takes the general path, so that
// its gradient is defined.
BCOS_HD inline int scale_mode(double b, bool b_is_tensor) {
  if (!b_is_tensor && b == 1.0) return kModeOne;
  if (!b_is_tensor && b == 2.0) return kModeTwo;
  return kModeGeneral;
}

// ---------------------------------------------------------------------------
// Bit casts and basic helpers (host and device).
// ---------------------------------------------------------------------------
BCOS_HD inline std::uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return static_cast<std::uint32_t>(__float_as_uint(x));
#else
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

BCOS_HD inline float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

BCOS_HD inline float abs_val(float x) { return ::fabsf(x); }
BCOS_HD inline double abs_val(double x) { return ::fabs(x); }
BCOS_HD inline float sqrt_val(float x) { return ::sqrtf(x); }
BCOS_HD inline double sqrt_val(double x) { return ::sqrt(x); }
// The libm log and exp (not the polynomials below): for formulas whose
// reference is torch.log / softmax and that are sensitive in the last bits
// (LWTA's Gumbel transform near u = 1).
BCOS_HD inline float log_std(float x) { return ::logf(x); }
BCOS_HD inline double log_std(double x) { return ::log(x); }
BCOS_HD inline float exp_std(float x) { return ::expf(x); }
BCOS_HD inline double exp_std(double x) { return ::exp(x); }

// ---------------------------------------------------------------------------
// Natural log of a positive float (branch-free, no division).
//   x = m * 2^k with m in [sqrt(1/2), sqrt(2)),  f = m - 1 (exact),
//   log(m) = f - f^2/2 + f^3 R(f),  R a degree-7 polynomial fitted (weighted
//   least squares on Chebyshev nodes) for a relative error of ~1.2e-7 in
//   float over the whole interval.
// NaN and +inf are returned unchanged; x must be > 0 (normal) otherwise.
// ---------------------------------------------------------------------------
BCOS_HD inline float log_pos(float x) {
  const std::uint32_t u = float_bits(x);
  int k = static_cast<int>(u >> 23) - 127;
  float m = bits_float((u & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  k = big ? k + 1 : k;
  const float f = m - 1.0f;
  float r = -0.07362867891788483f;
  r = r * f + 0.1262032687664032f;
  r = r * f - 0.13202103972434998f;
  r = r * f + 0.14227114617824554f;
  r = r * f - 0.16621370613574982f;
  r = r * f + 0.19999825954437256f;
  r = r * f - 0.2500085234642029f;
  r = r * f + 0.3333335518836975f;
  const float f2 = f * f;
  const float log_m = f - 0.5f * f2 + f2 * f * r;
  const float kf = static_cast<float>(k);
  // ln 2 split in a part exact in 16 bits and the rest.
  const float res = kf * 0.693145751953125f + (kf * 1.42860682030941723212e-6f + log_m);
  return (x < INFINITY) ? res : x;  // NaN compares false: passes through
}

BCOS_HD inline double log_pos(double x) { return ::log(x); }

// ---------------------------------------------------------------------------
// exp of a float (branch-free).  x = n ln2 + r, |r| <= ln2 / 2, Taylor series
// of e^r to degree 7 (truncation < 6e-9 relative), then 2^n applied in two
// halves so that results between FLT_MAX and the denormals come out right
// (overflow gives +inf, deep underflow gives 0).
// ---------------------------------------------------------------------------
BCOS_HD inline float exp_val(float x) {
  const bool is_nan = !(x == x);
  float xc = is_nan ? 0.0f : x;
  xc = xc < -104.0f ? -104.0f : xc;
  xc = xc > 89.0f ? 89.0f : xc;
  // Round x / ln2 to the nearest integer (|value| < 2^22, default rounding).
  const float kx = xc * 1.44269504088896341f;
  const float nf = (kx + 12582912.0f) - 12582912.0f;
  float r = xc - nf * 0.693145751953125f;
  r = r - nf * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int n = static_cast<int>(nf);
  const int n1 = n / 2;
  const int n2 = n - n1;
  const float s1 = bits_float(static_cast<std::uint32_t>(n1 + 127) << 23);
  const float s2 = bits_float(static_cast<std::uint32_t>(n2 + 127) << 23);
  const float res = (p * s1) * s2;
  return is_nan ? x : res;
}

BCOS_HD inline double exp_val(double x) { return ::exp(x); }

// t^e for t > 0.
BCOS_HD inline float pow_pos(float t, float e) { return exp_val(e * log_pos(t)); }
BCOS_HD inline double pow_pos(double t, double e) { return ::pow(t, e); }

// ---------------------------------------------------------------------------
// Patch norm.
// ---------------------------------------------------------------------------
template <typename T>
BCOS_HD inline T patch_norm_value(T sum_sq) {
  return sqrt_val(sum_sq + static_cast<T>(kNormEps));
}

// d norm / d x_k = x_k / norm: the backward scatters grad_norm / norm.
template <typename T>
BCOS_HD inline T patch_norm_grad_factor(T grad_norm, T norm) {
  return grad_norm / norm;
}

// ---------------------------------------------------------------------------
// Dynamic scale, forward.
// ---------------------------------------------------------------------------
template <typename T>
BCOS_HD inline T scale_forward_one(T l, T scale) {
  return l / scale;
}

template <typename T>
BCOS_HD inline T scale_forward_two(T l, T n, T scale) {
  return ((abs_val(l) / n) * l) / scale;
}

template <typename T>
BCOS_HD inline T scale_forward_general(T l, T n, T bm1, T scale) {
  const T t = abs_val(l / n) + static_cast<T>(kCosEps);
  return (pow_pos(t, bm1) * l) / scale;
}

// Mode dispatch (b, not b - 1).
template <typename T>
BCOS_HD inline T scale_forward(int mode, T l, T n, T b, T scale) {
  if (mode == kModeOne) return scale_forward_one(l, scale);
  if (mode == kModeTwo) return scale_forward_two(l, n, scale);
  return scale_forward_general(l, n, b - static_cast<T>(1), scale);
}

// Per-output-channel factor of the forward epilogue (an eval-mode batch norm
// folded into the layer): out = scale_forward(...) * channel_scale[o], one
// multiply of the finished value in the accumulation type, before the store.
// Kernels call it only when a factor is given (a compile-time flag), so the
// path without one stays bit-identical to plain scale_forward.  lin_max, the
// norm and the winner are never scaled: the backward reads them unscaled.
template <typename T>
BCOS_HD inline T apply_channel_scale(T out, T channel_scale) {
  return out * channel_scale;
}

// ---------------------------------------------------------------------------
// Dynamic scale, derivatives.  They take inv_n = 1 / n and inv_scale =
// 1 / scale: a kernel computes 1 / n once per position and shares it between
// all the output channels that use that norm, so no division by n is left
// per element.  With a compile-time `detach` the unused terms are dead code
// after inlining.
// ---------------------------------------------------------------------------
template <typename T>
struct ScaleGrads {
  T dl;  // d out / d l
  T dn;  // d out / d n  (0 when detach)
  T db;  // d out / d b  (general mode only)
};

template <typename T>
BCOS_HD inline ScaleGrads<T> scale_grads_one(T inv_scale) {
  return ScaleGrads<T>{inv_scale, static_cast<T>(0), static_cast<T>(0)};
}

template <typename T>
BCOS_HD inline ScaleGrads<T> scale_grads_two(T l, T inv_n, T inv_scale, bool detach) {
  const T c = abs_val(l) * inv_n;
  ScaleGrads<T> g;
  g.dl = (detach ? c : static_cast<T>(2) * c) * inv_scale;
  // -(l |l|) / n^2, written so that n^2 cannot underflow.
  g.dn = detach ? static_cast<T>(0) : -(c * (l * inv_n)) * inv_scale;
  g.db = static_cast<T>(0);
  return g;
}

template <typename T>
BCOS_HD inline ScaleGrads<T> scale_grads_general(T l, T inv_n, T bm1, T inv_scale, bool detach) {
  const T c = abs_val(l) * inv_n;
  const T t = c + static_cast<T>(kCosEps);
  const T log_t = log_pos(t);
  const T s = exp_val(bm1 * log_t);
  const T c_over_t = c / t;
  ScaleGrads<T> g;
  g.dl = (detach ? s : s * (static_cast<T>(1) + bm1 * c_over_t)) * inv_scale;
  g.dn = detach ? static_cast<T>(0) : -(bm1 * s * c_over_t) * (l * inv_n) * inv_scale;
  g.db = l * s * log_t * inv_scale;
  return g;
}

// The derivatives in the compile-time mode kMode, two or general (the
// kernels' inner loops; mode one needs no l and 1 / n: scale_grads_one).
template <int kMode, bool kDetach, typename T>
BCOS_HD inline ScaleGrads<T> scale_grads_of(T l, T inv_n, T bm1, T inv_scale) {
  static_assert(kMode == kModeTwo || kMode == kModeGeneral, "scale_grads_of: mode two or general");
  if constexpr (kMode == kModeTwo) {
    (void)bm1;
    return scale_grads_two(l, inv_n, inv_scale, kDetach);
  } else {
    return scale_grads_general(l, inv_n, bm1, inv_scale, kDetach);
  }
}

// Mode dispatch (b and n, not b - 1 and 1 / n).
template <typename T>
BCOS_HD inline ScaleGrads<T> scale_grads(int mode, T l, T n, T b, T scale, bool detach) {
  const T inv_scale = static_cast<T>(1) / scale;
  if (mode == kModeOne) return scale_grads_one(inv_scale);
  const T inv_n = static_cast<T>(1) / n;
  if (mode == kModeTwo) return scale_grads_two(l, inv_n, inv_scale, detach);
  return scale_grads_general(l, inv_n, b - static_cast<T>(1), inv_scale, detach);
}

// The scale backward kernels (CPU and CUDA) are built for these
// combinations of (mode, detach, need_dn, need_db): in mode one nothing but
// d out / d l; in mode two grad_norm only without detach, no grad_b; in the
// general mode grad_b with and without detach.  Calls
// fn(mode, detach, need_dn, need_db) with each argument a compile-time
// constant (std::integral_constant), the flags reduced to those combinations
// (need_dn is ignored with detach, need_db outside the general mode).
template <typename Fn>
auto dispatch_scale_backward(int mode, bool detach, bool need_dn, bool need_db, const Fn& fn) {
  using One = std::integral_constant<int, kModeOne>;
  using Two = std::integral_constant<int, kModeTwo>;
  using Gen = std::integral_constant<int, kModeGeneral>;
  using Y = std::true_type;
  using N = std::false_type;
  if (mode == kModeOne) return fn(One{}, N{}, N{}, N{});
  if (mode == kModeTwo) {
    if (detach) return fn(Two{}, Y{}, N{}, N{});
    if (need_dn) return fn(Two{}, N{}, Y{}, N{});
    return fn(Two{}, N{}, N{}, N{});
  }
  if (detach) return need_db ? fn(Gen{}, Y{}, N{}, Y{}) : fn(Gen{}, Y{}, N{}, N{});
  if (need_dn) return need_db ? fn(Gen{}, N{}, Y{}, Y{}) : fn(Gen{}, N{}, Y{}, N{});
  return need_db ? fn(Gen{}, N{}, N{}, Y{}) : fn(Gen{}, N{}, N{}, N{});
}

}  // namespace bcos_math

#endif  // BCOS_KERNELS_COMMON_BCOS_MATH_H_
