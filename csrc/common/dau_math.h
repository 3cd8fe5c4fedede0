// Math of the CoDA dynamic alignment unit (DAU) epilogue, shared by the CUDA
// kernels and the host tests.  The restructured form (DESIGN.md section 3,
// bcos_kernels/ops/dau_conv2d.py):
//
//   za     : z (rank r) of one pixel, with a constant 1 appended when the
//            layer has a bias (R = r + 1; else R = r)
//   y_o    : the R conv responses of DAU o at that pixel ([E_o | b_o] . x_patch)
//   G_o    : [E_o | b_o]^T [E_o | b_o]   (R x R, symmetric)
//   num_o  = za . y_o                    (= w_o . x_patch)
//   q_o    = za^T G_o za                 (= ||w_o||^2)
//   s_o    = sqrt(max(q_o, 0))
//   out_o  = num_o * inv_f(s_o),  inv_f = s / (1 + s^2) (squash) or 1 / s (l2); 0 where s == 0
//
// Backward, with g = d loss / d out_o:
//   dnum_o = g * inv_f(s_o)
//   dq_o   = g * out_o * ratio(s_o),  ratio = (d inv_f / d q) / inv_f  (0 in explanation mode)
//   d za   = sum_o dnum_o y_o + 2 dq_o G_o za
//   d y_o  = dnum_o za
//   M_o    = sum over pixels of dq_o za za^T   (the filters' gradient is 2 M_o [E_o | b_o] + ...)
#ifndef BCOS_KERNELS_COMMON_DAU_MATH_H_
#define BCOS_KERNELS_COMMON_DAU_MATH_H_

#include "bcos_math.h"  // BCOS_HD, sqrt_val

namespace bcos_math {

enum DauNorm : int { kDauSquash = 0, kDauL2 = 1 };

template <typename T>
struct DauScale {
  T inv;    // 1 / f(s)
  T ratio;  // (d inv / d q) / inv, q = s^2
};

// Both zero where s is not > 0 (an exactly-zero dynamic weight gives output 0
// and no gradient; NaN s also lands here).  The expressions and their order
// are those of ops/dau_conv2d.py::_scales.
template <typename T>
BCOS_HD inline DauScale<T> dau_scale(T s, int norm) {
  if (!(s > static_cast<T>(0))) return DauScale<T>{static_cast<T>(0), static_cast<T>(0)};
  const T one = static_cast<T>(1);
  const T q = s * s;
  if (norm == kDauSquash) {
    return DauScale<T>{s / (one + q), (one - q) / ((static_cast<T>(2) * q) * (one + q))};
  }
  return DauScale<T>{one / s, static_cast<T>(-0.5) / q};
}

// ||w|| from the quadratic form (clamped at 0 against rounding).

template <typename T>
BCOS_HD inline T dau_norm_from_quad(T q) {
  return sqrt_val(q > static_cast<T>(0) ? q : static_cast<T>(0));
}

// Numerator and quadratic form of one DAU for kPix pixels at once (so that
// each entry of G_o is loaded once per kPix pixels).
//   za   : kPix rows of R entries (row i at za + i * R)
//   gram : G_o, R x R row-major
//   y(i, q) -> T : the response q of this DAU at pixel i
// Summation order: q = sum_s za_s (sum_t G_st za_t), num = sum_s za_s y_s.
template <int kPix, typename T, typename Y>
BCOS_HD inline void dau_unit_forward(const T* za, int R, const T* gram, const Y& y, T* num, T* quad) {
  for (int i = 0; i < kPix; ++i) {
    num[i] = static_cast<T>(0);
    quad[i] = static_cast<T>(0);
  }
  for (int s = 0; s < R; ++s) {
    T gz[kPix];
    for (int i = 0; i < kPix; ++i) gz[i] = static_cast<T>(0);
    const T* grow = gram + static_cast<long long>(s) * R;
    for (int t = 0; t < R; ++t) {
      const T gst = grow[t];
      for (int i = 0; i < kPix; ++i) gz[i] += gst * za[i * R + t];
    }
    for (int i = 0; i < kPix; ++i) {
      const T zs = za[i * R + s];
      quad[i] += zs * gz[i];
      num[i] += zs * y(i, s);
    }
  }
}

// Entry t of d za for one pixel:  sum_o dnum_o y_o[t] + 2 dq_o (G_o za)[t].
//   dnum(o), dq(o), y(o, t) -> T;  gram: O blocks of R x R;  za: R entries.
// (G_o za)[t] is read as sum_s G_o[s, t] za_s (G_o is symmetric), so that
// threads working on consecutive t read consecutive entries.
template <typename T, typename DNum, typename DQ, typename Y>
BCOS_HD inline T dau_grad_za(int t, long long O, int R, const T* za, const T* gram, const DNum& dnum, const DQ& dq,
                             const Y& y, bool with_quad) {
  T acc = static_cast<T>(0);
  const long long RR = static_cast<long long>(R) * R;
  for (long long o = 0; o < O; ++o) {
    acc += dnum(o) * y(o, t);
    if (with_quad) {
      const T* g = gram + o * RR + t;
      T gz = static_cast<T>(0);
      for (int s = 0; s < R; ++s) gz += g[static_cast<long long>(s) * R] * za[s];
      acc += static_cast<T>(2) * dq(o) * gz;
    }
  }
  return acc;
}

}  // namespace bcos_math

#endif  // BCOS_KERNELS_COMMON_DAU_MATH_H_
