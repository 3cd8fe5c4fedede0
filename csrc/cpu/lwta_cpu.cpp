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
#include <cstdlib>
#include <cstdint>
#include <optional>
#include <string>
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
// and its 16-wide log for CPUs with AVX-512 (the Gumbel transform's two logs are most of a sampling forward)
extern "C" __m512 Sleef_logf16_u10(__m512) __attribute__((weak));
extern "C" __m512 Sleef_expf16_u10(__m512) __attribute__((weak));
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
// BCOS_KERNELS_CPU_ISA=baseline|avx2 lowers the instruction set, as for the B-cos kernels (csrc/cpu/bcos_cpu.cpp):
// the tests compare the paths, which give the same bits.
bool isa_allowed(const char* lowest_refused) {
  const char* env = std::getenv("BCOS_KERNELS_CPU_ISA");
  if (env == nullptr) return true;
  const std::string want(env);
  return !(want == "baseline" || want == lowest_refused);
}

bool have_avx2() {  // and SLEEF
  static const bool yes = isa_allowed("baseline") && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && &Sleef_logf8_u10 != nullptr &&
                          &Sleef_expf8_u10 != nullptr;
  return yes;
}

// 8 floats from p (len < 8: the first len, the rest `fill`), and the store of the first len of v.
__attribute__((target("avx2"), always_inline)) inline __m256i first_lanes(int64_t len) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(len)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
__attribute__((target("avx2"), always_inline)) inline __m256 load8(const float* p, int64_t len, float fill) {
  if (len == 8) return _mm256_loadu_ps(p);
  const __m256i lanes = first_lanes(len);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, lanes), _mm256_castsi256_ps(lanes));
}
__attribute__((target("avx2"), always_inline)) inline void store8(float* p, int64_t len, __m256 v) {
  if (len == 8) return _mm256_storeu_ps(p, v);
  _mm256_maskstore_ps(p, first_lanes(len), v);
}

// l[i] = (gumbel(u[i]) + x[i]) / temperature for i < n, the Gumbel transform as bcos_math::gumbel_from_uniform
// (a tail padded with a harmless u = 0.5).
__attribute__((target("avx2"))) void logits_avx2(const float* u, const float* x, float temperature, int64_t n,
                                                     float* l) {
  const __m256 eps = _mm256_set1_ps(static_cast<float>(bcos_math::kGumbelEps));
  const __m256 t = _mm256_set1_ps(temperature);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t len = std::min<int64_t>(8, n - i);
    __m256 a = Sleef_logf8_u10(_mm256_add_ps(load8(u + i, len, 0.5f), eps));
    a = Sleef_logf8_u10(_mm256_sub_ps(eps, a));
    const __m256 g = _mm256_xor_ps(a, sign);
    store8(l + i, len, _mm256_div_ps(_mm256_add_ps(g, load8(x + i, len, 0.0f)), t));
  }
}

bool have_avx512() {
  static const bool yes = isa_allowed("avx2") && have_avx2() && __builtin_cpu_supports("avx512f") && &Sleef_logf16_u10 != nullptr &&
                          &Sleef_expf16_u10 != nullptr;
  return yes;
}

// logits_avx2, 16 at a time (the same operations, so the same values).
__attribute__((target("avx512f"))) void logits_avx512(const float* u, const float* x, float temperature, int64_t n,
                                                      float* l) {
  const __m512 eps = _mm512_set1_ps(static_cast<float>(bcos_math::kGumbelEps));
  const __m512 t = _mm512_set1_ps(temperature);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t len = std::min<int64_t>(16, n - i);
    const __mmask16 lanes = static_cast<__mmask16>((1u << len) - 1u);
    const __m512 ui = _mm512_mask_loadu_ps(_mm512_set1_ps(0.5f), lanes, u + i);  // a tail padded with u = 0.5
    __m512 a = Sleef_logf16_u10(_mm512_add_ps(ui, eps));
    a = Sleef_logf16_u10(_mm512_sub_ps(eps, a));
    const __m512 g = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), sign));
    _mm512_mask_storeu_ps(l + i, lanes, _mm512_div_ps(_mm512_add_ps(g, _mm512_maskz_loadu_ps(lanes, x + i)), t));
  }
}

// mul_hilo, 16 lanes.
__attribute__((target("avx512f"), always_inline)) inline void mul_hilo16(__m512i m, __m512i a, __m512i& hi,
                                                                           __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// uniforms32_avx2 for the 64 elements from 4 * block: 16 Philox calls at once.
__attribute__((target("avx512f"))) void uniforms64_avx512(uint64_t seed, uint64_t offset, uint64_t block,
                                                          float* u) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(bcos_math::kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(bcos_math::kPhiloxM1));
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(block))),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(block >> 32)));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += bcos_math::kPhiloxW0;
      k1 += bcos_math::kPhiloxW1;
    }
    __m512i hi0, lo0, hi1, lo1;
    mul_hilo16(m0, c0, hi0, lo0);
    mul_hilo16(m1, c2, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
  }
  const __m512 scale = _mm512_set1_ps(5.9604644775390625e-08f);
  const __m512 f0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c0, 8)), scale);
  const __m512 f1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c1, 8)), scale);
  const __m512 f2 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c2, 8)), scale);
  const __m512 f3 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c3, 8)), scale);
  // lane L's 4 words to u[4L .. 4L + 3]: the 4 x 4 transposes of uniforms32_avx2 in each 128-bit quarter (r_j's
  // quarter i: lane 4i + j), then a 4 x 4 transpose of the quarters
  const __m512 t0 = _mm512_unpacklo_ps(f0, f1), t1 = _mm512_unpackhi_ps(f0, f1);
  const __m512 t2 = _mm512_unpacklo_ps(f2, f3), t3 = _mm512_unpackhi_ps(f2, f3);
  const __m512 r0 = _mm512_shuffle_ps(t0, t2, 0x44), r1 = _mm512_shuffle_ps(t0, t2, 0xEE);
  const __m512 r2 = _mm512_shuffle_ps(t1, t3, 0x44), r3 = _mm512_shuffle_ps(t1, t3, 0xEE);
  const __m512 a = _mm512_shuffle_f32x4(r0, r1, 0x44), b = _mm512_shuffle_f32x4(r2, r3, 0x44);
  const __m512 c = _mm512_shuffle_f32x4(r0, r1, 0xEE), d = _mm512_shuffle_f32x4(r2, r3, 0xEE);
  _mm512_storeu_ps(u, _mm512_shuffle_f32x4(a, b, 0x88));
  _mm512_storeu_ps(u + 16, _mm512_shuffle_f32x4(a, b, 0xDD));
  _mm512_storeu_ps(u + 32, _mm512_shuffle_f32x4(c, d, 0x88));
  _mm512_storeu_ps(u + 48, _mm512_shuffle_f32x4(c, d, 0xDD));
}

// logits_avx512 where the CPU has AVX-512, else logits_avx2.
void logits_vec(const float* u, const float* x, float temperature, int64_t n, float* l) {
  if (have_avx512()) return logits_avx512(u, x, temperature, n, l);
  logits_avx2(u, x, temperature, n, l);
}

// e[i] = exp(l[i] - m[i]) for i < n.
__attribute__((target("avx2"))) void exp_shifted_avx2(const float* l, const float* m, int64_t n, float* e) {
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t len = std::min<int64_t>(8, n - i);
    store8(e + i, len, Sleef_expf8_u10(_mm256_sub_ps(load8(l + i, len, 0.0f), load8(m + i, len, 0.0f))));
  }
}

// (hi, lo) 32-bit halves of m * a in each of the 8 lanes.
__attribute__((target("avx2"), always_inline)) inline void mul_hilo(__m256i m, __m256i a, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0, 2, 4, 6 as 64-bit products
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// bcos_math::uniform_from_bits of 8 words (below 2^24 after the shift: the signed conversion is exact).
__attribute__((target("avx2"), always_inline)) inline __m256 uniform_from_bits8(__m256i w) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), _mm256_set1_ps(5.9604644775390625e-08f));
}

// The uniforms of the 32 elements from 4 * block of the call (seed, offset) into u: 8 Philox calls at once, one
// per lane, the same rounds as bcos_math::philox4x32_10 (block's high word the same for all 8 lanes).
__attribute__((target("avx2"))) void uniforms32_avx2(uint64_t seed, uint64_t offset, uint64_t block,
                                                         float* u) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(bcos_math::kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(bcos_math::kPhiloxM1));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block))),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block >> 32)));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += bcos_math::kPhiloxW0;
      k1 += bcos_math::kPhiloxW1;
    }
    __m256i hi0, lo0, hi1, lo1;
    mul_hilo(m0, c0, hi0, lo0);
    mul_hilo(m1, c2, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
  }
  // words -> floats (bcos_math::uniform_from_bits), then lane L's 4 words to u[4L .. 4L + 3]
  const __m256 f0 = uniform_from_bits8(c0), f1 = uniform_from_bits8(c1);
  const __m256 f2 = uniform_from_bits8(c2), f3 = uniform_from_bits8(c3);
  const __m256 t0 = _mm256_unpacklo_ps(f0, f1), t1 = _mm256_unpackhi_ps(f0, f1);
  const __m256 t2 = _mm256_unpacklo_ps(f2, f3), t3 = _mm256_unpackhi_ps(f2, f3);
  const __m256 r0 = _mm256_shuffle_ps(t0, t2, 0x44), r1 = _mm256_shuffle_ps(t0, t2, 0xEE);  // lanes 0|4, 1|5
  const __m256 r2 = _mm256_shuffle_ps(t1, t3, 0x44), r3 = _mm256_shuffle_ps(t1, t3, 0xEE);  // lanes 2|6, 3|7
  _mm256_storeu_ps(u, _mm256_permute2f128_ps(r0, r1, 0x20));
  _mm256_storeu_ps(u + 8, _mm256_permute2f128_ps(r2, r3, 0x20));
  _mm256_storeu_ps(u + 16, _mm256_permute2f128_ps(r0, r1, 0x31));
  _mm256_storeu_ps(u + 24, _mm256_permute2f128_ps(r2, r3, 0x31));
}
#endif

// The uniforms of elements [start, start + n) of the call (seed, offset) into u: one Philox call per four
// elements (bcos_math::lwta_uniform draws element i from word i % 4 of the call for i / 4).
void fill_uniforms_scalar(uint64_t seed, uint64_t offset, int64_t start, int64_t n, float* u) {
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

// The same, 64 (AVX-512) or 32 (AVX2) elements at a time where the CPU has the instructions.
void fill_uniforms(uint64_t seed, uint64_t offset, int64_t start, int64_t n, float* u) {
#if defined(BCOS_LWTA_AVX2)
  if (have_avx2()) {
    const bool wide = have_avx512();
    const int64_t step = wide ? 64 : 32;
    const int64_t end = start + n;
    int64_t i = std::min(end, (start + 3) & ~int64_t{3});  // the vector steps start at a whole Philox call
    fill_uniforms_scalar(seed, offset, start, i - start, u);
    for (; i + step <= end; i += step) {
      const uint64_t block = static_cast<uint64_t>(i) >> 2;
      if ((block & 0xFFFFFFFFu) > 0xFFFFFFFFu - step / 4 + 1) {  // the low counter word wraps inside the step
        fill_uniforms_scalar(seed, offset, i, step, u + (i - start));
      } else if (wide) {
        uniforms64_avx512(seed, offset, block, u + (i - start));
      } else {
        uniforms32_avx2(seed, offset, block, u + (i - start));
      }
    }
    fill_uniforms_scalar(seed, offset, i, end - i, u + (i - start));
    return;
  }
#endif
  fill_uniforms_scalar(seed, offset, start, n, u);
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
  logits_vec(buf.u.data(), buf.x.data(), temperature, n, buf.l.data());
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
      // the losers, then the winner over its slot: two plain loops (one select per unit ran 3x slower)
      for (int k = 0; k < U; ++k) {
        out[start + off + k * s.inner] = static_cast<T>(bcos_math::lwta_loser_value(buf.x[off + k * s.inner], choice.p_win));
      }
      out[start + off + choice.winner * s.inner] = static_cast<T>(win_value);
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
    A p_win = A(0);  // deterministic: the loser mask is x * 0
    if (deterministic) {
      win = bcos_math::lwta_hard_choice<A>(U, x_at);
      win_value = x_at(win);  // the mask is exactly 1: x itself
    } else {
      A logits[256];
      for (int k = 0; k < U; ++k) logits[k] = (noise.template gumbel<A>(base + k * s.inner) + x_at(k)) / temperature;
      const auto choice = bcos_math::lwta_soft_choice<A>(U, [&](int k) { return logits[k]; });
      win = choice.winner;
      win_value = bcos_math::lwta_winner_value(x_at(win), choice.p_win);
      p_win = choice.p_win;
    }
    // the losers, then the winner over its slot: two plain loops (one select per unit ran 3x slower)
    for (int k = 0; k < U; ++k) out[base + k * s.inner] = static_cast<T>(bcos_math::lwta_loser_value(x_at(k), p_win));
    out[base + win * s.inner] = static_cast<T>(win_value);
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

// ---------------------------------------------------------------------------
// Sampling with the probabilities kept (lwta_sample_forward / lwta_sample_backward, fp32 and fp64 x): the forward
// stores each unit's softmax probability, so the backward reads them instead of drawing the noise again (its two
// logs and an exp an element were most of its cost). The winner is the first maximum of the kept probabilities,
// found again by the backward with the forward's comparisons.
// ---------------------------------------------------------------------------
#if defined(BCOS_LWTA_AVX2)
// 8 neighbouring blocks of a group (inner positions j .. j + len - 1; unit k of block j at k * inner + j): from
// their logits l, the probabilities into p and the output into out (x: the group's x). No FMA in this target,
// so the products and sums round as in the scalar bcos_math functions.
__attribute__((target("avx2"))) void sample_blocks8(const float* l, const float* x, int U, int64_t inner, int64_t len,
                                                    float* p, float* out) {
  __m256 m = load8(l, len, 0.0f);
  for (int k = 1; k < U; ++k) {
    const __m256 v = load8(l + k * inner, len, 0.0f);
    m = _mm256_blendv_ps(m, v, _mm256_cmp_ps(v, m, _CMP_GT_OQ));
  }
  __m256 sum = _mm256_setzero_ps();
  for (int k = 0; k < U; ++k) {
    const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(load8(l + k * inner, len, 0.0f), m));
    store8(p + k * inner, len, e);
    sum = _mm256_add_ps(sum, e);
  }
  __m256 best = _mm256_setzero_ps();
  __m256 win = _mm256_setzero_ps();  // the winner's unit index, as a float
  for (int k = 0; k < U; ++k) {
    const __m256 pk = _mm256_div_ps(load8(p + k * inner, len, 1.0f), sum);
    store8(p + k * inner, len, pk);
    const __m256 gt = k == 0 ? _mm256_castsi256_ps(_mm256_set1_epi32(-1)) : _mm256_cmp_ps(pk, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, pk, gt);
    win = _mm256_blendv_ps(win, _mm256_set1_ps(static_cast<float>(k)), gt);
  }
  const __m256 keep = _mm256_add_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), best), best);
  const __m256 lose = _mm256_sub_ps(best, best);  // lwta_loser_value's mask: 0, or NaN for a NaN block
  for (int k = 0; k < U; ++k) {
    const __m256 is_win = _mm256_cmp_ps(win, _mm256_set1_ps(static_cast<float>(k)), _CMP_EQ_OQ);
    const __m256 xk = load8(x + k * inner, len, 0.0f);
    store8(out + k * inner, len, _mm256_blendv_ps(_mm256_mul_ps(xk, lose), _mm256_mul_ps(xk, keep), is_win));
  }
}

// 16 floats from q where `lanes` is set, `fill` elsewhere.
__attribute__((target("avx512f"), always_inline)) inline __m512 load16(const float* q, __mmask16 lanes, float fill) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), lanes, q);
}

// sample_blocks8 for 16 neighbouring blocks (AVX-512: the same operations, so the same values).
__attribute__((target("avx512f"))) void sample_blocks16(const float* l, const float* x, int U, int64_t inner,
                                                        int64_t len, float* p, float* out) {
  const __mmask16 lanes = static_cast<__mmask16>((1u << len) - 1u);
  __m512 m = load16(l, lanes, 0.0f);
  for (int k = 1; k < U; ++k) {
    const __m512 v = load16(l + k * inner, lanes, 0.0f);
    m = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, m, _CMP_GT_OQ), m, v);
  }
  __m512 sum = _mm512_setzero_ps();
  for (int k = 0; k < U; ++k) {
    const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(load16(l + k * inner, lanes, 0.0f), m));
    _mm512_mask_storeu_ps(p + k * inner, lanes, e);
    sum = _mm512_add_ps(sum, e);
  }
  __m512 best = _mm512_setzero_ps();
  __m512i win = _mm512_setzero_si512();
  for (int k = 0; k < U; ++k) {
    const __m512 pk = _mm512_div_ps(load16(p + k * inner, lanes, 1.0f), sum);
    _mm512_mask_storeu_ps(p + k * inner, lanes, pk);
    const __mmask16 gt = k == 0 ? static_cast<__mmask16>(0xFFFF) : _mm512_cmp_ps_mask(pk, best, _CMP_GT_OQ);
    best = _mm512_mask_blend_ps(gt, best, pk);
    win = _mm512_mask_blend_epi32(gt, win, _mm512_set1_epi32(k));
  }
  const __m512 keep = _mm512_add_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), best), best);
  const __m512 lose = _mm512_sub_ps(best, best);  // lwta_loser_value's mask: 0, or NaN for a NaN block
  for (int k = 0; k < U; ++k) {
    const __mmask16 is_win = _mm512_cmpeq_epi32_mask(win, _mm512_set1_epi32(k));
    const __m512 xk = load16(x + k * inner, lanes, 0.0f);
    _mm512_mask_storeu_ps(out + k * inner, lanes,
                          _mm512_mask_blend_ps(is_win, _mm512_mul_ps(xk, lose), _mm512_mul_ps(xk, keep)));
  }
}

// The backward of 8 neighbouring blocks from their kept probabilities p (layout as sample_blocks8).
__attribute__((target("avx2"))) void sample_backward_blocks8(const float* grad_out, const float* x, const float* p,
                                                             int U, int64_t inner, int64_t len, float temperature,
                                                             float* grad_x) {
  __m256 best = _mm256_setzero_ps(), win = _mm256_setzero_ps();
  __m256 dot = _mm256_setzero_ps();
  for (int k = 0; k < U; ++k) {
    const __m256 pk = load8(p + k * inner, len, 0.0f);
    const __m256 gt = k == 0 ? _mm256_castsi256_ps(_mm256_set1_epi32(-1)) : _mm256_cmp_ps(pk, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, pk, gt);
    win = _mm256_blendv_ps(win, _mm256_set1_ps(static_cast<float>(k)), gt);
    const __m256 v = _mm256_mul_ps(load8(grad_out + k * inner, len, 0.0f), load8(x + k * inner, len, 0.0f));
    dot = _mm256_add_ps(dot, _mm256_mul_ps(v, pk));
  }
  const __m256 t = _mm256_set1_ps(temperature), one = _mm256_set1_ps(1.0f);
  for (int k = 0; k < U; ++k) {
    const __m256 pk = load8(p + k * inner, len, 0.0f);
    const __m256 up = load8(grad_out + k * inner, len, 0.0f);
    const __m256 v = _mm256_mul_ps(up, load8(x + k * inner, len, 0.0f));
    const __m256 grad = _mm256_div_ps(_mm256_mul_ps(_mm256_sub_ps(v, dot), pk), t);
    const __m256 with_win = _mm256_add_ps(grad, _mm256_mul_ps(up, _mm256_add_ps(_mm256_sub_ps(one, pk), pk)));
    const __m256 is_win = _mm256_cmp_ps(win, _mm256_set1_ps(static_cast<float>(k)), _CMP_EQ_OQ);
    store8(grad_x + k * inner, len, _mm256_blendv_ps(grad, with_win, is_win));
  }
}

// The forward over tiles of whole groups (fp32 x, AVX2): the noise and logits of a tile with the vector math;
// blocks 8 at a time along inner, or, for inner < 8 (blocks along a contiguous last dim), one at a time from
// the tile's exps.
template <typename Noise>
void sample_forward_tiles(const float* x, const Noise& noise, const LwtaShape& s, int U, float temperature,
                          float* out, float* probs) {
  const int64_t group = U * s.inner;
  for_each_tile(s, U, [&](int64_t g0, int64_t g1, TileBuffers& buf) {
    const int64_t start = g0 * group, n = (g1 - g0) * group;
    const float* u;
    if constexpr (std::is_same_v<Noise, PhiloxNoise>) {
      fill_uniforms(noise.seed, noise.offset, start, n, buf.u.data());
      u = buf.u.data();
    } else {
      u = noise.u + start;
    }
    float* l = buf.l.data();
    logits_vec(u, x + start, temperature, n, l);
    if (s.inner >= 8) {
      const bool wide = s.inner >= 16 && have_avx512();
      const int64_t step = wide ? 16 : 8;
      for (int64_t g = 0; g < n; g += group) {
        for (int64_t j = 0; j < s.inner; j += step) {
          const int64_t at = g + j, len = std::min<int64_t>(step, s.inner - j);
          (wide ? sample_blocks16 : sample_blocks8)(l + at, x + start + at, U, s.inner, len, probs + start + at,
                                                    out + start + at);
        }
      }
      return;
    }
    for (int64_t g = 0; g < n; g += group) {  // each element's block maximum, then the exps of the tile
      for (int64_t j = 0; j < s.inner; ++j) {
        float mx = l[g + j];
        for (int k = 1; k < U; ++k) mx = l[g + j + k * s.inner] > mx ? l[g + j + k * s.inner] : mx;
        for (int k = 0; k < U; ++k) buf.m[g + j + k * s.inner] = mx;
      }
    }
    exp_shifted_avx2(l, buf.m.data(), n, buf.e.data());
    for_each_tile_block(s, U, g0, g1, buf, [&](int64_t, int64_t off, const auto& prob) {
      float* p = probs + start + off;
      for (int k = 0; k < U; ++k) p[k * s.inner] = prob(k);
      const auto choice = bcos_math::lwta_choice_from_probs<float>(U, [&](int k) { return p[k * s.inner]; });
      const float win_value = bcos_math::lwta_winner_value(x[start + off + choice.winner * s.inner], choice.p_win);
      for (int k = 0; k < U; ++k) {
        out[start + off + k * s.inner] = bcos_math::lwta_loser_value(x[start + off + k * s.inner], choice.p_win);
      }
      out[start + off + choice.winner * s.inner] = win_value;
    });
  });
}
#endif

// The forward one block at a time (fp64, or no AVX2): the scalar math of forward_blocks, the probabilities kept.
template <typename T, typename Noise>
void sample_forward_blocks(const T* x, const Noise& noise, const LwtaShape& s, int U, T temperature, T* out,
                           T* probs) {
  for_each_block(s, U, [&](int64_t, int64_t base) {
    T logits[256];
    for (int k = 0; k < U; ++k) {
      logits[k] = (noise.template gumbel<T>(base + k * s.inner) + x[base + k * s.inner]) / temperature;
    }
    const auto st = bcos_math::softmax_stats<T>(U, [&](int k) { return logits[k]; });
    T* p = probs + base;
    for (int k = 0; k < U; ++k) p[k * s.inner] = bcos_math::softmax_prob(logits[k], st);
    const auto choice = bcos_math::lwta_choice_from_probs<T>(U, [&](int k) { return p[k * s.inner]; });
    const T win_value = bcos_math::lwta_winner_value(x[base + choice.winner * s.inner], choice.p_win);
    for (int k = 0; k < U; ++k) out[base + k * s.inner] = bcos_math::lwta_loser_value(x[base + k * s.inner], choice.p_win);
    out[base + choice.winner * s.inner] = win_value;
  });
}

template <typename T>
void sample_backward(const T* grad_out, const T* x, const T* probs, const LwtaShape& s, int U, T temperature,
                     T* grad_x) {
#if defined(BCOS_LWTA_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    if (have_avx2() && s.inner >= 8) {
      const int64_t group = U * s.inner, groups = s.outer * (s.C / U);
      at::parallel_for(0, groups, std::max<int64_t>(1, kTileElems / group), [&](int64_t b, int64_t e) {
        for (int64_t g = b * group; g < e * group; g += group) {
          for (int64_t j = 0; j < s.inner; j += 8) {
            sample_backward_blocks8(grad_out + g + j, x + g + j, probs + g + j, U, s.inner,
                                    std::min<int64_t>(8, s.inner - j), temperature, grad_x + g + j);
          }
        }
      });
      return;
    }
  }
#endif
  for_each_block(s, U, [&](int64_t, int64_t base) {
    auto prob = [&](int k) { return probs[base + k * s.inner]; };
    auto up = [&](int k) { return grad_out[base + k * s.inner]; };
    auto v = [&](int k) { return up(k) * x[base + k * s.inner]; };
    auto store = [&](int k, T g) { grad_x[base + k * s.inner] = g; };
    const int win = bcos_math::lwta_choice_from_probs<T>(U, prob).winner;
    bcos_math::lwta_backward_from_probs<T>(U, win, temperature, prob, v, up, store);
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

std::tuple<at::Tensor, at::Tensor> lwta_sample_forward(const at::Tensor& x_in, int64_t competitors,
                                                       double temperature, const std::optional<at::Tensor>& noise_in,
                                                       int64_t seed, int64_t offset) {
  CpuDevice::check(x_in, "x");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "lwta_sample_forward: x must be float32 or float64 (the probabilities are kept in its dtype), got ",
              x_in.scalar_type());
  const LwtaShape s = bcos_checks::check_lwta_args(x_in, competitors, temperature, false);
  const at::Tensor noise = bcos_checks::lwta_noise<CpuDevice>(noise_in, x_in, false);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor probs = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return {out, probs};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lwta_sample_forward", [&] {
    with_noise<scalar_t>(noise, seed, offset, [&](const auto& source) {
      const int U = static_cast<int>(competitors);
#if defined(BCOS_LWTA_AVX2)
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (have_avx2()) {
          sample_forward_tiles(x.const_data_ptr<float>(), source, s, U, static_cast<float>(temperature),
                               out.data_ptr<float>(), probs.data_ptr<float>());
          return;
        }
      }
#endif
      sample_forward_blocks(x.const_data_ptr<scalar_t>(), source, s, U, static_cast<scalar_t>(temperature),
                            out.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>());
    });
  });
  return {out, probs};
}

at::Tensor lwta_sample_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& probs_in,
                                int64_t competitors, double temperature) {
  CpuDevice::check(x_in, "x");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kDouble,
              "lwta_sample_backward: x must be float32 or float64, got ", x_in.scalar_type());
  const LwtaShape s = bcos_checks::check_lwta_args(x_in, competitors, temperature, false);
  for (const auto& [t, name] : {std::pair{&grad_out_in, "grad_out"}, std::pair{&probs_in, "probs"}}) {
    CpuDevice::check_with(*t, name, x_in, "x");
    bcos_checks::check_same_dtype(*t, name, x_in, "x");
    TORCH_CHECK(t->sizes() == x_in.sizes(), name, " must have the shape of x ", x_in.sizes(), ", got ", t->sizes());
  }
  const at::Tensor x = x_in.contiguous(), grad_out = grad_out_in.contiguous(), probs = probs_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lwta_sample_backward", [&] {
    sample_backward(grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                    probs.const_data_ptr<scalar_t>(), s, static_cast<int>(competitors),
                    static_cast<scalar_t>(temperature), grad_x.data_ptr<scalar_t>());
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
