// Plain C++ test (no torch) of csrc/common/bcos_math.h.
//
//  - forward values vs the formulas written out with std::pow (double)
//  - d out / d l, d out / d n, d out / d b vs central finite differences (double)
//  - detach mode: d out / d l is the scale factor alone, d out / d n is zero
//  - the float log/exp/pow vs double std:: functions
//  - zero inputs (l == 0, tiny norms) give finite values and derivatives
//  - the per-channel factor: one multiply of the finished value (1 leaves it
//    bit for bit, 0 and negative factors behave as a product)
// Exit status: 0 when every check passes, 1 otherwise.
#include <cmath>
#include <cstdio>
#include <limits>

#include "common/bcos_math.h"
#include "tests/test_harness.h"

namespace {

void check(bool ok, const char* what, double got, double want, double b, double l, double n) {
  if (!bcos_test::count(ok)) {
    std::printf("FAIL %-28s got % .17g want % .17g  (b=%g l=%g n=%g)\n", what, got, want, b, l, n);
  }
}

void check_close(const char* what, double got, double want, double rtol, double atol, double b = 0, double l = 0,
                 double n = 0) {
  const bool ok = std::isfinite(got) && std::fabs(got - want) <= atol + rtol * std::fabs(want);
  check(ok, what, got, want, b, l, n);
}

// The forward formulas, written independently with std::pow.
double forward_expected(double l, double n, double b, bool b_is_tensor, double scale) {
  if (!b_is_tensor && b == 1.0) return l / scale;
  if (!b_is_tensor && b == 2.0) return std::fabs(l) / n * l / scale;
  return std::pow(std::fabs(l / n) + 1e-6, b - 1.0) * l / scale;
}

double fwd(int mode, double l, double n, double b, double scale) {
  return bcos_math::scale_forward<double>(mode, l, n, b, scale);
}

void test_forward_and_derivatives() {
  const double bs[] = {1.0, 1.5, 2.0, 2.5, 3.0};
  const double ls[] = {-2.3, -0.7, -0.05, 0.013, 0.4, 1.9};
  const double ns[] = {0.5, 1.0, 3.7};
  const double scales[] = {1.0, 0.25, 3.0};
  for (double b : bs) {
    for (int bt = 0; bt < 2; ++bt) {
      const bool b_is_tensor = bt == 1;
      const int mode = bcos_math::scale_mode(b, b_is_tensor);
      for (double scale : scales) {
        for (double l : ls) {
          for (double n : ns) {
            const double out = fwd(mode, l, n, b, scale);
            check_close("forward value", out, forward_expected(l, n, b, b_is_tensor, scale), 1e-14, 1e-300, b, l, n);

            // Derivatives (not detached) vs central differences.
            const bcos_math::ScaleGrads<double> d = bcos_math::scale_grads<double>(mode, l, n, b, scale, false);
            const double hl = 1e-6 * std::fmax(1.0, std::fabs(l));
            const double fd_l = (fwd(mode, l + hl, n, b, scale) - fwd(mode, l - hl, n, b, scale)) / (2 * hl);
            check_close("d out/d l", d.dl, fd_l, 1e-6, 1e-8, b, l, n);
            const double hn = 1e-6 * n;
            const double fd_n = (fwd(mode, l, n + hn, b, scale) - fwd(mode, l, n - hn, b, scale)) / (2 * hn);
            check_close("d out/d n", d.dn, mode == bcos_math::kModeOne ? 0.0 : fd_n, 1e-6, 1e-8, b, l, n);
            if (mode == bcos_math::kModeGeneral) {
              const double hb = 1e-6;
              const double fd_b = (fwd(mode, l, n, b + hb, scale) - fwd(mode, l, n, b - hb, scale)) / (2 * hb);
              check_close("d out/d b", d.db, fd_b, 1e-6, 1e-8, b, l, n);
            } else {
              check_close("d out/d b (not general)", d.db, 0.0, 0.0, 0.0, b, l, n);
            }

            // Detached: the scale factor is a constant, so d out/d l = out / l
            // and no gradient reaches n; d out/d b is still the full one.
            const bcos_math::ScaleGrads<double> dd = bcos_math::scale_grads<double>(mode, l, n, b, scale, true);
            check_close("detach d out/d l", dd.dl, out / l, 1e-13, 1e-300, b, l, n);
            check_close("detach d out/d n", dd.dn, 0.0, 0.0, 0.0, b, l, n);
            check_close("detach d out/d b", dd.db, d.db, 1e-14, 1e-300, b, l, n);
          }
        }
      }
    }
  }
}

void test_zero_inputs() {
  const double bs[] = {1.0, 1.5, 2.0, 2.5, 3.0};
  const double ns[] = {1e-12, 1e-6, 1e-3, 1.0};
  for (double b : bs) {
    for (int bt = 0; bt < 2; ++bt) {
      const int mode = bcos_math::scale_mode(b, bt == 1);
      for (double n : ns) {
        for (int detach = 0; detach < 2; ++detach) {
          const double outd = bcos_math::scale_forward<double>(mode, 0.0, n, b, 1.0);
          const auto gd = bcos_math::scale_grads<double>(mode, 0.0, n, b, 1.0, detach == 1);
          check(outd == 0.0, "zero input: forward (double)", outd, 0.0, b, 0.0, n);
          check(std::isfinite(gd.dl) && std::isfinite(gd.dn) && std::isfinite(gd.db),
                "zero input: grads finite (double)", gd.dl + gd.dn + gd.db, 0.0, b, 0.0, n);
          const float nf = static_cast<float>(n);
          const float outf = bcos_math::scale_forward<float>(mode, 0.0f, nf, static_cast<float>(b), 1.0f);
          const auto gf = bcos_math::scale_grads<float>(mode, 0.0f, nf, static_cast<float>(b), 1.0f, detach == 1);
          check(outf == 0.0f, "zero input: forward (float)", outf, 0.0, b, 0.0, n);
          check(std::isfinite(gf.dl) && std::isfinite(gf.dn) && std::isfinite(gf.db),
                "zero input: grads finite (float)", static_cast<double>(gf.dl) + gf.dn + gf.db, 0.0, b, 0.0, n);
          // At l == 0 the exact values are known: dl = eps^(b-1) (general), 0 (two), dn = db = 0.
          if (mode == bcos_math::kModeGeneral && detach == 0) {
            check_close("zero input: d out/d l", gd.dl, std::pow(1e-6, b - 1.0), 1e-12, 0.0, b, 0.0, n);
            check_close("zero input: d out/d l (float)", gf.dl, std::pow(1e-6, b - 1.0), 2e-6, 0.0, b, 0.0, n);
          }
        }
      }
    }
  }
  // Patch norm of an all-zero patch, and its gradient factor.
  check_close("patch norm of zeros", bcos_math::patch_norm_value(0.0), 1e-3, 1e-15, 0.0);
  check_close("patch norm of zeros (float)", bcos_math::patch_norm_value(0.0f), 1e-3, 1e-6, 0.0);
  check_close("patch norm value", bcos_math::patch_norm_value(4.0), std::sqrt(4.0 + 1e-6), 1e-15, 0.0);
  const double h = 1e-6;
  const double s = 2.5;
  const double fd = (bcos_math::patch_norm_value(s + h) - bcos_math::patch_norm_value(s - h)) / (2 * h);
  // d norm / d x = x / norm: with sum = x^2 + s, d norm / d sum = 1 / (2 norm).
  check_close("patch norm d/d sum", 0.5 / bcos_math::patch_norm_value(s), fd, 1e-8, 0.0);
  check_close("patch norm grad factor", bcos_math::patch_norm_grad_factor(3.0, 1.5), 2.0, 0.0, 0.0);
}

void test_float_transcendentals() {
  double max_log = 0.0, max_exp = 0.0, max_pow = 0.0;
  // log over [1e-6, 1e6] (the range of |cos| + eps and beyond)
  for (int i = 0; i <= 200000; ++i) {
    const double xd = std::pow(10.0, -6.0 + 12.0 * i / 200000.0);
    const float x = static_cast<float>(xd);
    const double want = std::log(static_cast<double>(x));
    const double got = bcos_math::log_pos(x);
    const double err = std::fabs(got - want) / std::fmax(std::fabs(want), 1e-30);
    // near x = 1 the log is ~0: use an absolute bound there
    const double e = std::fabs(want) < 1e-3 ? std::fabs(got - want) / 1e-3 : err;
    max_log = std::fmax(max_log, e);
  }
  for (int i = 0; i <= 200000; ++i) {
    const float x = static_cast<float>(-87.0 + 175.0 * i / 200000.0);
    const double want = std::exp(static_cast<double>(x));
    const double got = bcos_math::exp_val(x);
    max_exp = std::fmax(max_exp, std::fabs(got - want) / want);
  }
  const float es[] = {-0.75f, -0.5f, 0.25f, 0.5f, 1.0f, 1.5f, 2.0f};
  for (float e : es) {
    for (int i = 0; i <= 20000; ++i) {
      const float t = static_cast<float>(std::pow(10.0, -6.0 + 8.0 * i / 20000.0));
      const double want = std::pow(static_cast<double>(t), static_cast<double>(e));
      const double got = bcos_math::pow_pos(t, e);
      max_pow = std::fmax(max_pow, std::fabs(got - want) / want);
    }
  }
  std::printf("float log max rel err %.3g, exp %.3g, pow %.3g\n", max_log, max_exp, max_pow);
  check(max_log < 3e-7, "float log accuracy", max_log, 3e-7, 0, 0, 0);
  check(max_exp < 3e-7, "float exp accuracy", max_exp, 3e-7, 0, 0, 0);
  check(max_pow < 2e-6, "float pow accuracy", max_pow, 2e-6, 0, 0, 0);

  // Special values.
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  check(std::isnan(bcos_math::log_pos(nan)), "log(NaN) is NaN", 0, 0, 0, 0, 0);
  check(bcos_math::log_pos(inf) == inf, "log(inf) is inf", 0, 0, 0, 0, 0);
  check(std::isnan(bcos_math::exp_val(nan)), "exp(NaN) is NaN", 0, 0, 0, 0, 0);
  check(bcos_math::exp_val(200.0f) == inf, "exp(200) overflows to inf", bcos_math::exp_val(200.0f), 0, 0, 0, 0);
  check(bcos_math::exp_val(-200.0f) == 0.0f, "exp(-200) underflows to 0", bcos_math::exp_val(-200.0f), 0, 0, 0, 0);
  check(bcos_math::exp_val(0.0f) == 1.0f, "exp(0) == 1", bcos_math::exp_val(0.0f), 1, 0, 0, 0);
  check_close("exp(88.5)", bcos_math::exp_val(88.5f), std::exp(88.5), 1e-6, 0.0);
  check_close("exp(-100) (denormal)", bcos_math::exp_val(-100.0f), std::exp(-100.0), 1e-3, 1e-45);
}

void test_float_matches_double() {
  // The float formulas track the double ones (they are what bf16/fp32 run).
  const float bs[] = {1.5f, 2.0f, 2.5f, 3.0f};
  double worst = 0.0;
  for (float b : bs) {
    for (int bt = 0; bt < 2; ++bt) {
      const int mode = bcos_math::scale_mode(b, bt == 1);
      for (int i = 0; i < 400; ++i) {
        const float l = -3.0f + 6.0f * static_cast<float>(i) / 399.0f;
        const float n = 0.3f + 0.01f * static_cast<float>(i % 97);
        const double od = bcos_math::scale_forward<double>(mode, l, n, b, 1.0);
        const double of = bcos_math::scale_forward<float>(mode, l, n, b, 1.0f);
        const auto gd = bcos_math::scale_grads<double>(mode, l, n, b, 1.0, false);
        const auto gf = bcos_math::scale_grads<float>(mode, l, n, b, 1.0f, false);
        // d out/d b = out * ln(t): near t == 1 the log is ill-conditioned in
        // the float inputs, so its error is measured against |out|.
        const double errs[] = {std::fabs(od - of) / (1e-6 + std::fabs(od)),
                               std::fabs(gd.dl - gf.dl) / (1e-6 + std::fabs(gd.dl)),
                               std::fabs(gd.dn - gf.dn) / (1e-6 + std::fabs(gd.dn)),
                               std::fabs(gd.db - gf.db) / (1e-6 + std::fabs(gd.db) + std::fabs(od))};
        for (double e : errs) worst = std::fmax(worst, e);
      }
    }
  }
  check(worst < 1e-5, "float formulas vs double", worst, 1e-5, 0, 0, 0);
}

void test_two_mode_is_bitwise() {
  // b == 2: ((|l| / n) * l) / scale, operation by operation, in float.
  const float ls[] = {-1.7f, -0.3f, 0.0f, 0.11f, 2.9f};
  const float ns[] = {0.25f, 0.9f, 3.3f};
  for (float l : ls) {
    for (float n : ns) {
      const float a = std::fabs(l) / n;
      const float m = a * l;
      const float want = m / 0.7f;
      const float got = bcos_math::scale_forward<float>(bcos_math::kModeTwo, l, n, 2.0f, 0.7f);
      check(got == want, "b == 2 bitwise order", got, want, 2.0, l, n);
    }
  }
}

void test_apply_channel_scale() {
  // A folded batch norm multiplies the finished output once: the result is
  // the product of the unscaled value and the factor, in the same type.
  const float cs[] = {0.0f, 1.0f, -1.0f, 0.37f, -2.5f};
  const double bs[] = {1.0, 2.0, 1.5};
  const float ls[] = {-1.3f, 0.0f, 0.6f};
  for (double b : bs) {
    const int mode = bcos_math::scale_mode(b, false);
    for (float l : ls) {
      const float out = bcos_math::scale_forward<float>(mode, l, 0.8f, static_cast<float>(b), 0.7f);
      for (float c : cs) {
        const float got = bcos_math::apply_channel_scale(out, c);
        check(got == out * c, "channel scale is one multiply", got, out * c, b, l, 0.8);
      }
      // a factor of 1 is the unscaled value, bit for bit
      check(bcos_math::apply_channel_scale(out, 1.0f) == out, "channel scale 1", out, out, b, l, 0.8);
    }
  }
  check(bcos_math::apply_channel_scale(3.0, -0.5) == -1.5, "channel scale double", -1.5, -1.5, 0, 3.0, 0);
}

}  // namespace

int main() {
  return bcos_test::run({test_forward_and_derivatives, test_zero_inputs, test_float_transcendentals,
                         test_float_matches_double, test_two_mode_is_bitwise, test_apply_channel_scale});
}
