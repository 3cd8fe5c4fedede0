// Plain C++ test (no torch, no CUDA) of the math headers the CUDA kernels
// share with the host: csrc/common/philox.h, lwta_math.h, dau_math.h.
//
//  - Philox4x32-10 against the published known-answer vectors (Random123)
//  - the uniform stream: range, and the counter/word layout of lwta_uniform
//  - Gumbel transform vs the formula in double, finite over [0, 1)
//  - LWTA block choice vs a plain softmax; first maximum on ties
//  - LWTA straight-through backward vs central differences of sum_j v_j p_j(x)
//  - DAU 1 / f(s) and its log-derivative vs central differences; zero norms
//  - DAU per-pixel numerator, quadratic form and d za vs plain loops
// Exit status: 0 when every check passes, 1 otherwise.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "common/dau_math.h"
#include "common/lwta_math.h"
#include "common/philox.h"
#include "tests/test_harness.h"

namespace {

void check(bool ok, const char* what, double got, double want) {
  if (!bcos_test::count(ok)) {
    std::printf("FAIL %-40s got % .17g want % .17g\n", what, got, want);
  }
}

void check_close(const char* what, double got, double want, double rtol, double atol) {
  check(std::isfinite(got) && std::fabs(got - want) <= atol + rtol * std::fabs(want), what, got, want);
}

void test_philox() {
  struct Kat {
    std::uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0u, 0u, 0u, 0u}, {0u, 0u}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& k : kats) {
    const bcos_math::Philox4x32 r =
        bcos_math::philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) check(r.v[i] == k.out[i], "philox known answer", r.v[i], k.out[i]);
  }
  check(bcos_math::uniform_from_bits(0u) == 0.0f, "uniform of 0", bcos_math::uniform_from_bits(0u), 0.0);
  const float top = bcos_math::uniform_from_bits(0xffffffffu);
  check(top < 1.0f && top == 1.0f - 5.9604644775390625e-08f, "uniform of all ones < 1", top, 1.0);
  // element i: word i % 4 of the block (i / 4, offset) under key seed
  const std::uint64_t seed = 0x0123456789abcdefull, offset = 0x0000000500000003ull;
  for (std::uint64_t i = 0; i < 12; ++i) {
    const std::uint64_t blk = i / 4;
    const bcos_math::Philox4x32 r =
        bcos_math::philox4x32_10(static_cast<std::uint32_t>(blk), static_cast<std::uint32_t>(blk >> 32), 3u, 5u,
                                 0x89abcdefu, 0x01234567u);
    const float want = bcos_math::uniform_from_bits(r.v[i % 4]);
    check(bcos_math::lwta_uniform(seed, offset, i) == want, "lwta_uniform layout", bcos_math::lwta_uniform(seed, offset, i),
          want);
  }
}

void test_gumbel() {
  double worst = 0.0;
  bool finite = true, exact = true;
  for (int i = 0; i < (1 << 16); ++i) {
    const float u = bcos_math::uniform_from_bits(static_cast<std::uint32_t>(i) << 16 | 0xffffu);
    const float g = bcos_math::gumbel_from_uniform(u);
    finite = finite && std::isfinite(g);
    // the original's float steps, one rounding each
    const float a = std::log(u + 1e-5f);
    const float want_f = -std::log(-a + 1e-5f);
    exact = exact && g == want_f;
    if (u < 0.9f) {  // near u = 1 the float formula cancels (as the original's): compare where it is well conditioned
      const double want = -std::log(-std::log(static_cast<double>(u) + 1e-5) + 1e-5);
      worst = std::fmax(worst, std::fabs(g - want) / std::fmax(1.0, std::fabs(want)));
    }
  }
  check(finite, "gumbel finite on [0, 1)", 0, 0);
  check(exact, "gumbel = the float steps of the original", 0, 0);
  check(worst < 1e-5, "gumbel vs double formula (u < 0.9)", worst, 1e-5);
  const float g0 = bcos_math::gumbel_from_uniform(0.0f);
  const float g1 = bcos_math::gumbel_from_uniform(bcos_math::uniform_from_bits(0xffffffffu));
  check(std::isfinite(g0) && std::isfinite(g1), "gumbel at the ends of [0, 1)", g0, g1);
  const double gd = bcos_math::gumbel_from_uniform(0.25);
  check_close("gumbel double", gd, -std::log(-std::log(0.25 + 1e-5) + 1e-5), 1e-15, 0.0);
}

void test_lwta_choice() {
  const double logits[] = {0.3, -1.2, 2.5, 2.49, 0.0};
  const int units = 5;
  auto logit = [&](int k) { return logits[k]; };
  const bcos_math::LwtaChoice<double> c = bcos_math::lwta_soft_choice<double>(units, logit);
  double mx = logits[0], sum = 0.0;
  for (double v : logits) mx = std::fmax(mx, v);
  for (double v : logits) sum += std::exp(v - mx);
  check(c.winner == 2, "soft choice winner", c.winner, 2);
  check_close("soft choice p_win", c.p_win, std::exp(2.5 - mx) / sum, 1e-15, 0.0);
  const float tied[] = {1.0f, 3.0f, 3.0f, -2.0f};
  auto tied_at = [&](int k) { return tied[k]; };
  check(bcos_math::lwta_soft_choice<float>(4, tied_at).winner == 1, "ties: first maximum (soft)", 0, 1);
  check(bcos_math::lwta_hard_choice<float>(4, tied_at) == 1, "ties: first maximum (hard)", 0, 1);
  check(bcos_math::lwta_winner_value(2.0, 0.7) == 2.0 * ((1.0 - 0.7) + 0.7), "winner value", 0, 0);
  // NaN as torch.argmax takes it (the first NaN is the maximum), and losers that keep a NaN or inf x non-finite
  const float with_nan[] = {1.0f, std::nanf(""), 5.0f, std::nanf("")};
  auto nan_at = [&](int k) { return with_nan[k]; };
  check(bcos_math::lwta_hard_choice<float>(4, nan_at) == 1, "first NaN wins (hard)", 0, 1);
  check(bcos_math::lwta_loser_value(-3.0f, 0.0f) == 0.0f, "loser value 0", 0, 0);
  check(std::isnan(bcos_math::lwta_loser_value(std::nanf(""), 0.4f)), "a NaN loser stays NaN", 0, 0);
  check(std::isnan(bcos_math::lwta_loser_value(INFINITY, 0.4f)), "an inf loser gives NaN (inf * 0)", 0, 0);
  check(std::isnan(bcos_math::lwta_loser_value(2.0f, std::nanf(""))), "a NaN block is NaN throughout", 0, 0);
}

void test_lwta_backward() {
  const int units = 4;
  const double T = 0.67;
  const double x[] = {0.4, -0.9, 1.3, 0.2};
  const double g[] = {0.11, -0.5, 0.3, -0.8};  // Gumbel noise
  const double up[] = {1.5, -0.25, 0.75, 2.0};  // incoming gradient
  auto probs = [&](const double* xv, double* p) {
    double mx = -1e300, sum = 0.0;
    for (int k = 0; k < units; ++k) mx = std::fmax(mx, (xv[k] + g[k]) / T);
    for (int k = 0; k < units; ++k) sum += std::exp((xv[k] + g[k]) / T - mx);
    for (int k = 0; k < units; ++k) p[k] = std::exp((xv[k] + g[k]) / T - mx) / sum;
  };
  double p[4];
  probs(x, p);
  int win = 0;
  for (int k = 1; k < units; ++k) win = p[k] > p[win] ? k : win;
  double grad[4];
  auto logit = [&](int k) { return (g[k] + x[k]) / T; };
  auto v = [&](int k) { return up[k] * x[k]; };
  auto upf = [&](int k) { return up[k]; };
  auto store = [&](int k, double val) { grad[k] = val; };
  bcos_math::lwta_soft_backward<double>(units, win, T, logit, v, upf, store);
  // straight-through: grad_k = up_k * mask_k + d/dx_k sum_j v_j p_j(x) with v fixed
  for (int k = 0; k < units; ++k) {
    const double h = 1e-6;
    double xp[4], xm[4], pp[4], pm[4];
    for (int j = 0; j < units; ++j) xp[j] = xm[j] = x[j];
    xp[k] += h;
    xm[k] -= h;
    probs(xp, pp);
    probs(xm, pm);
    double fd = 0.0;
    for (int j = 0; j < units; ++j) fd += up[j] * x[j] * (pp[j] - pm[j]) / (2 * h);
    const double want = fd + (k == win ? up[k] * ((1.0 - p[k]) + p[k]) : 0.0);
    check_close("lwta backward vs finite differences", grad[k], want, 1e-7, 1e-9);
  }
}

void test_dau_scale() {
  for (int norm : {bcos_math::kDauSquash, bcos_math::kDauL2}) {
    auto inv_of_q = [&](double q) {
      const double s = std::sqrt(q);
      return norm == bcos_math::kDauSquash ? s / (1 + q) : 1 / s;
    };
    for (double s : {0.05, 0.7, 1.0, 2.3, 40.0}) {
      const bcos_math::DauScale<double> sc = bcos_math::dau_scale(s, norm);
      const double q = s * s;
      check_close("dau inv_f", sc.inv, inv_of_q(q), 1e-14, 0.0);
      const double h = 1e-6 * q;
      const double dlog = (inv_of_q(q + h) - inv_of_q(q - h)) / (2 * h) / inv_of_q(q);
      check_close("dau ratio = d log inv / d q", sc.ratio, dlog, 1e-6, 1e-9);
    }
    const bcos_math::DauScale<float> zero = bcos_math::dau_scale(0.0f, norm);
    check(zero.inv == 0.0f && zero.ratio == 0.0f, "dau zero norm gives 0", zero.inv, 0);
    const bcos_math::DauScale<float> nan = bcos_math::dau_scale(std::nanf(""), norm);
    check(nan.inv == 0.0f && nan.ratio == 0.0f, "dau NaN norm gives 0", nan.inv, 0);
  }
  check(bcos_math::dau_norm_from_quad(-1e-9) == 0.0, "dau negative quad clamps", 0, 0);
  check_close("dau norm", bcos_math::dau_norm_from_quad(6.25), 2.5, 0.0, 0.0);
}

void test_dau_pixel() {
  constexpr int kPix = 3;
  const int R = 5;
  const long long O = 2;
  std::vector<double> za(kPix * R), gram(O * R * R), y(kPix * O * R);
  for (int i = 0; i < kPix * R; ++i) za[i] = std::sin(1.3 * i + 0.2);
  for (long long o = 0; o < O; ++o) {
    // G_o = A^T A, symmetric
    for (int s = 0; s < R; ++s) {
      for (int t = 0; t < R; ++t) {
        double acc = 0.0;
        for (int d = 0; d < 7; ++d) acc += std::cos(0.7 * d + s + 3.0 * o) * std::cos(0.7 * d + t + 3.0 * o);
        gram[(o * R + s) * R + t] = acc;
      }
    }
  }
  for (int i = 0; i < kPix * O * R; ++i) y[i] = std::cos(0.9 * i);
  for (long long o = 0; o < O; ++o) {
    double num[kPix], quad[kPix];
    auto y_at = [&](int i, int q) { return y[(i * O + o) * R + q]; };
    bcos_math::dau_unit_forward<kPix>(za.data(), R, gram.data() + o * R * R, y_at, num, quad);
    for (int i = 0; i < kPix; ++i) {
      double wn = 0.0, wq = 0.0;
      for (int s = 0; s < R; ++s) {
        wn += za[i * R + s] * y_at(i, s);
        for (int t = 0; t < R; ++t) wq += za[i * R + s] * gram[(o * R + s) * R + t] * za[i * R + t];
      }
      check_close("dau numerator", num[i], wn, 1e-13, 1e-13);
      check_close("dau quadratic form", quad[i], wq, 1e-13, 1e-13);
    }
  }
  // d za for pixel 0 with given dnum, dq
  const double dnum[] = {0.3, -1.1};
  const double dq[] = {-0.4, 0.9};
  for (int t = 0; t < R; ++t) {
    auto dn = [&](long long o) { return dnum[o]; };
    auto dqf = [&](long long o) { return dq[o]; };
    auto yv = [&](long long o, int q) { return y[(0 * O + o) * R + q]; };
    const double got = bcos_math::dau_grad_za(t, O, R, za.data(), gram.data(), dn, dqf, yv, true);
    double want = 0.0;
    for (long long o = 0; o < O; ++o) {
      double gz = 0.0;
      for (int s = 0; s < R; ++s) gz += gram[(o * R + t) * R + s] * za[s];
      want += dnum[o] * yv(o, t) + 2.0 * dq[o] * gz;
    }
    check_close("dau d za", got, want, 1e-13, 1e-13);
  }
}

}  // namespace

int main() {
  return bcos_test::run(
      {test_philox, test_gumbel, test_lwta_choice, test_lwta_backward, test_dau_scale, test_dau_pixel});
}
