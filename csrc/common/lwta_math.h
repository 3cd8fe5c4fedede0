// Per-block math of DISCOVER's local winner-takes-all (LWTA), shared by the
// CPU and CUDA kernels and the host tests.  Semantics:
// bcos_kernels/ops/lwta/reference.py and the docstring of bcos_kernels/ops/lwta/__init__.py.
//
// A block holds U competing units.  The functions below see a block through
// small functors (logit(k), x(k), ...) so that a kernel can feed them from
// registers (U known at compile time) or recompute each value on demand
// (any U), and a host test can feed them from plain arrays.
//
//   stochastic:    l_k = (x_k + g_k) / T,  g_k = gumbel(u_k)
//                  p   = softmax(l) over the block, winner = first argmax of p
//                  out_k = k == winner ? x_k * ((1 - p_k) + p_k) : x_k * (p_w - p_w)
//                  grad_k = ((v_k - sum_j p_j v_j) * p_k) / T + (k == winner) * g'_k * ((1 - p_k) + p_k)
//                           with g' the incoming gradient and v = g' * x
//   deterministic: winner = first argmax of x (a NaN is the maximum, as torch.argmax takes it),
//                  out_k = k == winner ? x_k : x_k * 0, grad_k = (k == winner) * g'_k
//
// A loser's output is x_k times the original's mask value there, 0 ((0 - p_k) + p_k in the stochastic mode), not
// the constant 0: a NaN or inf x_k then gives NaN, and a block whose softmax is NaN (a NaN or +inf logit) is NaN
// throughout, as in the original.  p_w - p_w is that mask value: the softmax of a block is NaN everywhere or
// nowhere.
//
// The expression (1 - p) + p is the value at the winner of the original's
// straight-through mask (y_hard - y_soft).detach() + y_soft; it is 1 up to
// rounding and is kept so that results follow the original.
#ifndef BCOS_KERNELS_COMMON_LWTA_MATH_H_
#define BCOS_KERNELS_COMMON_LWTA_MATH_H_

#include "bcos_math.h"  // BCOS_HD, log_std, exp_std
#include "philox.h"     // lwta_uniform

namespace bcos_math {

// Element index of unit 0 of competition block `idx` of x viewed as (outer,
// C, inner), the blocks in (outer, C / U, inner) order: neighbouring blocks
// are neighbouring inner positions, so a pass over the blocks reads memory in
// order (every backend's kernels, CPU and CUDA, walk the blocks this way).
BCOS_HD inline int64_t lwta_block_base(int64_t C, int64_t inner, int64_t idx, int U) {
  const int64_t blocks = C / U;
  const int64_t b = idx % inner;
  const int64_t t = idx / inner;
  return ((t / blocks) * C + (t % blocks) * U) * inner + b;
}

// The epsilon of the original's Gumbel transform (ResNet code).
constexpr double kGumbelEps = 1e-5;

// Gumbel noise -log(-log(u + eps) + eps), one operation at a time in the
// arithmetic type T of u; `round` rounds an intermediate to the storage type
// of the noise (identity for float and double, a round trip through half for
// fp16/bf16 noise), because torch rounds to the tensor's dtype after every
// operation.  For u in [0, 1) every intermediate stays finite.
template <typename T, typename Round>
BCOS_HD inline T gumbel_from_uniform(T u, const Round& round) {
  const T eps = static_cast<T>(kGumbelEps);
  T a = round(u + eps);
  a = round(log_std(a));
  a = round(eps - a);  // (-a) + eps: negation is exact, so this is the same sum
  a = round(log_std(a));
  return -a;
}

template <typename T>
struct IdentityRound {
  BCOS_HD T operator()(T v) const { return v; }
};

template <typename T>
BCOS_HD inline T gumbel_from_uniform(T u) {
  return gumbel_from_uniform(u, IdentityRound<T>{});
}

// The uniforms a kernel draws from (seed, offset) (philox.h's stream) as a
// noise source of the kernels (gumbel(i): the Gumbel noise of element i):
// the transform computed in float, as the front door does with its float32
// torch.rand noise.
struct PhiloxNoise {
  std::uint64_t seed, offset;
  template <typename A>
  BCOS_HD A gumbel(std::int64_t index) const {
    const float u = lwta_uniform(seed, offset, static_cast<std::uint64_t>(index));
    return static_cast<A>(gumbel_from_uniform(u));
  }
};

// Softmax statistics of a block: max of the logits and sum of exp(l - max).
template <typename T>
struct SoftmaxStats {
  T max;
  T sum;
};

template <typename T, typename Logit>
BCOS_HD inline SoftmaxStats<T> softmax_stats(int units, const Logit& logit) {
  T mx = logit(0);
  for (int k = 1; k < units; ++k) {
    const T v = logit(k);
    mx = v > mx ? v : mx;
  }
  T sum = static_cast<T>(0);
  for (int k = 0; k < units; ++k) sum += exp_std(logit(k) - mx);
  return SoftmaxStats<T>{mx, sum};
}

template <typename T>
BCOS_HD inline T softmax_prob(T logit, const SoftmaxStats<T>& st) {
  return exp_std(logit - st.max) / st.sum;
}

template <typename T>
struct LwtaChoice {
  int winner;
  T p_win;  // the softmax probability of the winner (stochastic mode)
};

// Stochastic forward from the block's softmax probabilities prob(k): winner =
// first maximum of p (strict >, as torch.max).
template <typename T, typename Prob>
BCOS_HD inline LwtaChoice<T> lwta_choice_from_probs(int units, const Prob& prob) {
  T best = prob(0);
  int win = 0;
  for (int k = 1; k < units; ++k) {
    const T p = prob(k);
    if (p > best) {
      best = p;
      win = k;
    }
  }
  return LwtaChoice<T>{win, best};
}

// Stochastic forward from the logits.
template <typename T, typename Logit>
BCOS_HD inline LwtaChoice<T> lwta_soft_choice(int units, const Logit& logit) {
  const SoftmaxStats<T> st = softmax_stats<T>(units, logit);
  return lwta_choice_from_probs<T>(units, [&](int k) { return softmax_prob(logit(k), st); });
}

// Deterministic forward: first maximum of x.
template <typename T, typename X>
BCOS_HD inline int lwta_hard_choice(int units, const X& x) {
  T best = x(0);
  int win = 0;
  bool any_nan = best != best;
  for (int k = 1; k < units; ++k) {
    const T v = x(k);
    any_nan |= v != v;  // no branch on it here: the common loop stays the plain first argmax
    if (v > best) {
      best = v;
      win = k;
    }
  }
  if (any_nan) {  // the first NaN wins, as in torch.argmax
    for (int k = 0; k < units; ++k) {
      if (x(k) != x(k)) return k;
    }
  }
  return win;
}

// The forward value at the winner (stochastic mode).
template <typename T>
BCOS_HD inline T lwta_winner_value(T x_win, T p_win) {
  return x_win * ((static_cast<T>(1) - p_win) + p_win);
}

// A loser's output (see the top): x times the mask's 0, p_win - p_win (deterministic mode: p_win = 0).
template <typename T>
BCOS_HD inline T lwta_loser_value(T x, T p_win) {
  return x * (p_win - p_win);
}

// Stochastic backward of one block from its softmax probabilities prob(k):
// store(k, grad_k) for every unit.  v(k): g'_k * x_k; up(k): g'_k; `winner`
// from the forward.
template <typename T, typename Prob, typename V, typename Up, typename Store>
BCOS_HD inline void lwta_backward_from_probs(int units, int winner, T temperature, const Prob& prob, const V& v,
                                             const Up& up, const Store& store) {
  T dot = static_cast<T>(0);
  for (int k = 0; k < units; ++k) dot += v(k) * prob(k);
  for (int k = 0; k < units; ++k) {
    const T p = prob(k);
    T grad = ((v(k) - dot) * p) / temperature;
    if (k == winner) grad += up(k) * ((static_cast<T>(1) - p) + p);
    store(k, grad);
  }
}

// Stochastic backward from the logits l_k.
template <typename T, typename Logit, typename V, typename Up, typename Store>
BCOS_HD inline void lwta_soft_backward(int units, int winner, T temperature, const Logit& logit, const V& v,
                                       const Up& up, const Store& store) {
  const SoftmaxStats<T> st = softmax_stats<T>(units, logit);
  lwta_backward_from_probs<T>(
      units, winner, temperature, [&](int k) { return softmax_prob(logit(k), st); }, v, up, store);
}

}  // namespace bcos_math

#endif  // BCOS_KERNELS_COMMON_LWTA_MATH_H_
