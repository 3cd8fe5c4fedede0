// CPU kernels of DISCOVER's LWTA: the ops lwta_block_forward, lwta_block_backward and lwta_uniform (schemas and
// semantics: csrc/cuda_schemas.cpp), the same as the CUDA backend's -- the per-block math of
// csrc/common/lwta_math.h and the Philox stream of csrc/common/philox.h, so a seed draws the same uniforms here
// as on a GPU.  One pass over the competition blocks each way (at::parallel_for over ranges of blocks in memory
// order, a partition fixed by the shape); the backward re-draws the forward's uniforms from (seed, offset)
// instead of storing them.  bf16/fp16 compute in float, as the CUDA kernels.
//
// The stochastic mode costs three transcendentals an element (the two logs of the Gumbel transform, the exp of
// the softmax): on x86 CPUs with AVX2 the float path computes them eight at a time with SLEEF (the vector math
// library torch's own CPU kernels use, exported by libtorch_cpu), over tiles of whole competition blocks in
// memory order; elsewhere, and for fp64 or half-precision noise, one block at a time with the scalar math.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BCOS_LWTA_AVX2 1
// SLEEF's 8-wide float log and exp (1.0 ulp), as torch's vectorised CPU kernels call them; callable only on a CPU
// with AVX2 (checked at run time). Weak: a torch build that does not export them still loads this library, and
// the kernels then take the scalar path.
extern "C" __m256 Sleef_logf8_u10(__m256) __attribute__((weak));
extern "C" __m256 Sleef_expf8_u10(__m256) __attribute__((weak));
#endif

#include "arg_checks.h"
#include "common/lwta_math.h"
#include "common/philox.h"

namespace bcos_kernels {
namespace cpu {
namespace {

using bcos_checks::CpuDevice;
using bcos_checks::LwtaShape;
using bcos_math::PhiloxNoise;

// Blocks per unit of parallel work.
constexpr int64_t kBlockGrain = 2048;

// Uniforms given as a tensor of dtype NT: the Gumbel transform in NT's compute type, rounded to NT after every
// operation (torch's semantics for half tensors).
template <typename NT>
struct TensorNoise {
  const NT* u;
  template <typename A>
  A gumbel(int64_t index) const {
    using NA = at::opmath_type<NT>;
    auto round = [](NA v) { return static_cast<NA>(static_cast<NT>(v)); };
    return static_cast<A>(bcos_math::gumbel_from_uniform(static_cast<NA>(u[index]), round));
  }
};

// ---------------------------------------------------------------------------
// The vector path (float compute, AVX2): tiles of whole groups, a group being the U * inner contiguous elements
// of one (outer, block row), which hold `inner` blocks (block j's unit k at k * inner + j).
// ---------------------------------------------------------------------------
#if defined(BCOS_LWTA_AVX2)
bool have_avx2() {  // and SLEEF
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          &Sleef_logf8_u10 != nullptr && &Sleef_expf8_u10 != nullptr;
  return yes;
}

// l[i] = (gumbel(u[i]) + x[i]) / temperature for i < n, the Gumbel transform as bcos_math::gumbel_from_uniform.
__attribute__((target("avx2,fma"))) void logits_avx2(const float* u, const float* x, float temperature, int64_t n,
                                                     float* l) {
  const __m256 eps = _mm256_set1_ps(static_cast<float>(bcos_math::kGumbelEps));
  const __m256 t = _mm256_set1_ps(temperature);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t len = std::min<int64_t>(8, n - i);
    alignas(32) float ub[8] = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f};
    alignas(32) float xb[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::copy(u + i, u + i + len, ub);  // the tail padded with a harmless 0.5
    std::copy(x + i, x + i + len, xb);
    __m256 a = Sleef_logf8_u10(_mm256_add_ps(_mm256_load_ps(ub), eps));
    a = Sleef_logf8_u10(_mm256_sub_ps(eps, a));
    const __m256 g = _mm256_xor_ps(a, sign);
    alignas(32) float out[8];
    _mm256_store_ps(out, _mm256_div_ps(_mm256_add_ps(g, _mm256_load_ps(xb)), t));
    std::copy(out, out + len, l + i);
  }
}

// e[i] = exp(l[i] - m[i]) for i < n.
__attribute__((target("avx2,fma"))) void exp_shifted_avx2(const float* l, const float* m, int64_t n, float* e) {
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t len = std::min<int64_t>(8, n - i);
    alignas(32) float lb[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    alignas(32) float mb[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::copy(l + i, l + i + len, lb);
    std::copy(m + i, m + i + len, mb);
    alignas(32) float out[8];
    _mm256_store_ps(out, Sleef_expf8_u10(_mm256_sub_ps(_mm256_load_ps(lb), _mm256_load_ps(mb))));
    std::copy(out, out + len, e + i);
  }
}
#endif

// The uniforms of elements [start, start + n) of the call (seed, offset) into u: one Philox call per four
// elements (bcos_math::lwta_uniform draws element i from word i % 4 of the call for i / 4).
void fill_uniforms(uint64_t seed, uint64_t offset, int64_t start, int64_t n, float* u) {
  int64_t i = start;
  const int64_t end = start + n;
  while (i < end) {
    const uint64_t block = static_cast<uint64_t>(i) >> 2;
    const bcos_math::Philox4x32 r = bcos_math::philox4x32_10(
        static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), static_cast<uint32_t>(offset),
        static_cast<uint32_t>(offset >> 32), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    for (int64_t w = i & 3; w < 4 && i < end; ++w, ++i) u[i - start] = bcos_math::uniform_from_bits(r.v[w]);
  }
}

// A tile's buffers, per thread.
struct TileBuffers {
  std::vector<float> u, x, l, m, e;
  void resize(int64_t n) {
    for (auto* v : {&u, &x, &l, &m, &e}) v->resize(n);
  }
};

// Calls tile(g0, g1) over ranges of whole groups, each at most about kTileElems elements (one group at least).
constexpr int64_t kTileElems = 4096;
template <typename Tile>
void for_each_tile(const LwtaShape& s, int U, const Tile& tile) {
  const int64_t group = U * s.inner;
  const int64_t groups = s.outer * (s.C / U);
  const int64_t per_tile = std::max<int64_t>(1, kTileElems / std::max<int64_t>(group, 1));
  const int64_t tiles = (groups + per_tile - 1) / per_tile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    TileBuffers buf;
    buf.resize(per_tile * group);
    for (int64_t t = begin; t < end; ++t) tile(t * per_tile, std::min(groups, (t + 1) * per_tile), buf);
  });
}

// The logits of a tile's elements [start, start + n) and, per block, the exp of their shift by the block's
// maximum: buf.l, buf.e (buf.x holds x in float).  Noise: PhiloxNoise or TensorNoise<float>.
template <typename T, typename Noise>
void tile_softmax_terms(const T* x, const Noise& noise, const LwtaShape& s, int U, float temperature, int64_t start,
                        int64_t n, TileBuffers& buf) {
#if defined(BCOS_LWTA_AVX2)
  if constexpr (std::is_same_v<Noise, PhiloxNoise>) {
    fill_uniforms(noise.seed, noise.offset, start, n, buf.u.data());
  } else {
    std::copy(noise.u + start, noise.u + start + n, buf.u.data());
  }
  for (int64_t i = 0; i < n; ++i) buf.x[i] = static_cast<float>(x[start + i]);
  logits_avx2(buf.u.data(), buf.x.data(), temperature, n, buf.l.data());
  // each element's block maximum (a block's units lie inner apart in its group)
  const int64_t group = U * s.inner;
  for (int64_t g0 = 0; g0 < n; g0 += group) {
    for (int64_t j = 0; j < s.inner; ++j) {
      const float* l = buf.l.data() + g0 + j;
      float mx = l[0];
      for (int k = 1; k < U; ++k) mx = l[k * s.inner] > mx ? l[k * s.inner] : mx;
      for (int k = 0; k < U; ++k) buf.m[g0 + j + k * s.inner] = mx;
    }
  }
  exp_shifted_avx2(buf.l.data(), buf.m.data(), n, buf.e.data());
#else
  (void)x, (void)noise, (void)s, (void)U, (void)temperature, (void)start, (void)n, (void)buf;
#endif
}

// Calls block(idx, offset in the tile, prob) for every block of a tile whose softmax terms are in buf, prob(k)
// its unit k's softmax probability (the block's exps over their sum, summed in unit order as softmax_stats).
template <typename Block>
void for_each_tile_block(const LwtaShape& s, int U, int64_t g0, int64_t g1, const TileBuffers& buf,
                         const Block& block) {
  const int64_t group = U * s.inner;
  for (int64_t gi = g0; gi < g1; ++gi) {
    for (int64_t j = 0; j < s.inner; ++j) {
      const int64_t off = (gi - g0) * group + j;
      const float* e = buf.e.data() + off;
      float sum = 0.0f;
      for (int k = 0; k < U; ++k) sum += e[k * s.inner];
      block(gi * s.inner + j, off, [&](int k) { return e[k * s.inner] / sum; });
    }
  }
}

template <typename T, typename Noise>
void forward_tiles(const T* x, T* out, uint8_t* winner, const LwtaShape& s, int U, float temperature,
                   const Noise& noise) {
  for_each_tile(s, U, [&](int64_t g0, int64_t g1, TileBuffers& buf) {
    const int64_t start = g0 * U * s.inner;
    tile_softmax_terms(x, noise, s, U, temperature, start, (g1 - g0) * U * s.inner, buf);
    for_each_tile_block(s, U, g0, g1, buf, [&](int64_t idx, int64_t off, const auto& prob) {
      const auto choice = bcos_math::lwta_choice_from_probs<float>(U, prob);
      const float win_value = bcos_math::lwta_winner_value(buf.x[off + choice.winner * s.inner], choice.p_win);
      for (int k = 0; k < U; ++k) out[start + off + k * s.inner] = static_cast<T>(k == choice.winner ? win_value : 0.0f);
      winner[idx] = static_cast<uint8_t>(choice.winner);
    });
  });
}

template <typename T, typename Noise>
void backward_tiles(const T* grad_out, const T* x, const uint8_t* winner, T* grad_x, const LwtaShape& s, int U,
                    float temperature, const Noise& noise) {
  for_each_tile(s, U, [&](int64_t g0, int64_t g1, TileBuffers& buf) {
    const int64_t start = g0 * U * s.inner;
    tile_softmax_terms(x, noise, s, U, temperature, start, (g1 - g0) * U * s.inner, buf);
    for_each_tile_block(s, U, g0, g1, buf, [&](int64_t idx, int64_t off, const auto& prob) {
      const int64_t base = start + off;
      auto up = [&](int k) { return static_cast<float>(grad_out[base + k * s.inner]); };
      auto v = [&](int k) { return up(k) * buf.x[off + k * s.inner]; };
      auto store = [&](int k, float g) { grad_x[base + k * s.inner] = static_cast<T>(g); };
      bcos_math::lwta_backward_from_probs<float>(U, winner[idx], temperature, prob, v, up, store);
    });
  });
}

// Whether the vector path runs this call: float compute (fp32/bf16/fp16 x), noise drawn or float32, AVX2.
template <typename T>
bool use_tiles(const at::Tensor& noise) {
#if defined(BCOS_LWTA_AVX2)
  return !std::is_same_v<T, double> && (!noise.defined() || noise.scalar_type() == at::kFloat) && have_avx2();
#else
  (void)noise;
  return false;
#endif
}

// Calls body(idx, base) for every competition block idx, base = the element index of its unit 0
// (bcos_math::lwta_block_base, stepped through without a division per block).
template <typename Body>
void for_each_block(const LwtaShape& s, int U, const Body& body) {
  const int64_t total = s.outer * (s.C / U) * s.inner;
  at::parallel_for(0, total, kBlockGrain, [&](int64_t begin, int64_t end) {
    int64_t j = begin % s.inner;  // the block's inner position; its group (outer, block row) is idx / inner
    int64_t base = bcos_math::lwta_block_base(s.C, s.inner, begin, U);
    for (int64_t idx = begin; idx < end; ++idx) {
      body(idx, base);
      if (++j == s.inner) {  // the next group starts U * inner elements after this one's
        j = 0;
        base += (U - 1) * s.inner + 1;
      } else {
        ++base;
      }
    }
  });
}

template <typename T, typename Noise>
void forward_blocks(const T* x, T* out, uint8_t* winner, const LwtaShape& s, int U, double temperature_in,
                    bool deterministic, const Noise& noise) {
  using A = at::opmath_type<T>;
  const A temperature = static_cast<A>(temperature_in);
  for_each_block(s, U, [&](int64_t idx, int64_t base) {
    auto x_at = [&](int k) { return static_cast<A>(x[base + k * s.inner]); };
    int win;
    A win_value;
    if (deterministic) {
      win = bcos_math::lwta_hard_choice<A>(U, x_at);
      win_value = x_at(win);  // the mask is exactly 1: x itself
    } else {
      A logits[256];
      for (int k = 0; k < U; ++k) logits[k] = (noise.template gumbel<A>(base + k * s.inner) + x_at(k)) / temperature;
      const auto choice = bcos_math::lwta_soft_choice<A>(U, [&](int k) { return logits[k]; });
      win = choice.winner;
      win_value = bcos_math::lwta_winner_value(x_at(win), choice.p_win);
    }
    for (int k = 0; k < U; ++k) out[base + k * s.inner] = static_cast<T>(k == win ? win_value : A(0));
    winner[idx] = static_cast<uint8_t>(win);
  });
}

template <typename T, typename Noise>
void backward_blocks(const T* grad_out, const T* x, const uint8_t* winner, T* grad_x, const LwtaShape& s, int U,
                     double temperature_in, bool deterministic, const Noise& noise) {
  using A = at::opmath_type<T>;
  const A temperature = static_cast<A>(temperature_in);
  for_each_block(s, U, [&](int64_t idx, int64_t base) {
    const int win = winner[idx];
    auto up = [&](int k) { return static_cast<A>(grad_out[base + k * s.inner]); };
    auto store = [&](int k, A v) { grad_x[base + k * s.inner] = static_cast<T>(v); };
    if (deterministic) {
      for (int k = 0; k < U; ++k) store(k, k == win ? up(k) : A(0));
      return;
    }
    auto x_at = [&](int k) { return static_cast<A>(x[base + k * s.inner]); };
    A logits[256];
    for (int k = 0; k < U; ++k) logits[k] = (noise.template gumbel<A>(base + k * s.inner) + x_at(k)) / temperature;
    bcos_math::lwta_soft_backward<A>(
        U, win, temperature, [&](int k) { return logits[k]; }, [&](int k) { return up(k) * x_at(k); }, up, store);
  });
}

// Runs fn(noise source) with the uniforms of `noise` (float32 or T) or, when it is undefined, drawn from
// (seed, offset).
template <typename T, typename Fn>
void with_noise(const at::Tensor& noise, int64_t seed, int64_t offset, const Fn& fn) {
  if (!noise.defined()) {
    fn(PhiloxNoise{static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)});
  } else if (noise.scalar_type() == at::kFloat) {
    fn(TensorNoise<float>{noise.const_data_ptr<float>()});
  } else {
    fn(TensorNoise<T>{noise.const_data_ptr<T>()});
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lwta_block_forward(const at::Tensor& x_in, int64_t competitors, double temperature,
                                                      bool deterministic, const std::optional<at::Tensor>& noise_in,
                                                      int64_t seed, int64_t offset) {
  CpuDevice::check(x_in, "x");
  bcos_checks::check_float_dtype(x_in, "x");
  const LwtaShape s = bcos_checks::check_lwta_args(x_in, competitors, temperature, deterministic);
  const at::Tensor noise = bcos_checks::lwta_noise<CpuDevice>(noise_in, x_in, deterministic);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor winner = at::empty(bcos_checks::lwta_winner_shape(x, competitors), x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, winner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lwta_block_forward", [&] {
    with_noise<scalar_t>(noise, seed, offset, [&](const auto& source) {
      const int U = static_cast<int>(competitors);
      if (!deterministic && use_tiles<scalar_t>(noise)) {
        forward_tiles(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), winner.data_ptr<uint8_t>(), s, U,
                      static_cast<float>(temperature), source);
      } else {
        forward_blocks(x.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), winner.data_ptr<uint8_t>(), s, U,
                       temperature, deterministic, source);
      }
    });
  });
  return {out, winner};
}

at::Tensor lwta_block_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& winner_in,
                               int64_t competitors, double temperature, bool deterministic,
                               const std::optional<at::Tensor>& noise_in, int64_t seed, int64_t offset) {
  CpuDevice::check(x_in, "x");
  bcos_checks::check_float_dtype(x_in, "x");
  bcos_checks::check_lwta_backward_args<CpuDevice>(grad_out_in, x_in, winner_in, competitors);
  const LwtaShape s = bcos_checks::check_lwta_args(x_in, competitors, temperature, deterministic);
  const at::Tensor noise = bcos_checks::lwta_noise<CpuDevice>(noise_in, x_in, deterministic);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor winner = winner_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lwta_block_backward", [&] {
    with_noise<scalar_t>(noise, seed, offset, [&](const auto& source) {
      const int U = static_cast<int>(competitors);
      if (!deterministic && use_tiles<scalar_t>(noise)) {
        backward_tiles(grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                       winner.const_data_ptr<uint8_t>(), grad_x.data_ptr<scalar_t>(), s, U,
                       static_cast<float>(temperature), source);
      } else {
        backward_blocks(grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                        winner.const_data_ptr<uint8_t>(), grad_x.data_ptr<scalar_t>(), s, U, temperature,
                        deterministic, source);
      }
    });
  });
  return grad_x;
}

at::Tensor lwta_uniform(const at::Tensor& x, int64_t seed, int64_t offset) {
  CpuDevice::check(x, "x");
  at::Tensor u = at::empty(x.sizes(), x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  float* out = u.data_ptr<float>();
  at::parallel_for(0, u.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    fill_uniforms(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), begin, end - begin, out + begin);
  });
  return u;
}

}  // namespace cpu
}  // namespace bcos_kernels
