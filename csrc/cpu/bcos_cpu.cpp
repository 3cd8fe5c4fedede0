// CPU kernels of the B-cos ops (schemas in csrc/ops.cpp).
//
//   patch_norm           : channel sum of squares -> box sum -> sqrt
//   patch_norm_backward  : grad_norm / norm -> transposed box sum -> * x
//   bcos_scale_forward   : MaxOut + dynamic scale (+ optional per-channel factor), one pass over lin
//   bcos_scale_backward  : gradients w.r.t. lin, norm and b (one pass)
//
// All loops run over contiguous inner dimensions so the compiler vectorises
// them; work is split with at::parallel_for (respects torch.set_num_threads)
// into units whose partition depends only on the shapes, never on the number
// of threads, so every result (the grad_b reduction included) is
// deterministic.  bf16/fp16 compute in float, fp32 in float, fp64 in double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "arg_checks.h"
#include "common/bcos_math.h"

namespace bcos_kernels {
namespace cpu {
namespace {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Minimum number of scalar operations a parallel task should carry, so that
// tiny problems run inline instead of paying for a parallel region.
constexpr int64_t kMinTaskWork = 32768;

inline int64_t grain_for(int64_t work_per_unit) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_unit));
}

// ---------------------------------------------------------------------------
// Parallel loops over work units, with AVX2 and AVX-512 builds of the bodies.
//
// parallel_units(n, grain, body) runs body(begin, end) over [0, n) with
// at::parallel_for (so torch.set_num_threads applies).  The extension is
// compiled for the baseline ISA; on x86-64 the body (declared with
// BCOS_UNIT_BODY, i.e. always inlined) is also compiled into wrappers that
// target AVX2+FMA and AVX-512, and one the CPU supports is picked at run
// time (see kComputeBound below).  All builds compute the same formulas;
// they may differ in the last bit where the compiler fuses a multiply-add
// (never in the b == 1 and b == 2 forwards, which have no addition).
// ---------------------------------------------------------------------------
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BCOS_HAVE_ISA_CLONES 1
#define BCOS_UNIT_BODY __attribute__((always_inline))
#else
#define BCOS_HAVE_ISA_CLONES 0
#define BCOS_UNIT_BODY
#endif
// Helpers called from unit bodies: always inlined, so they are compiled for
// the ISA of the body that calls them.
#if defined(__GNUC__) || defined(__clang__)
#define BCOS_FORCE_INLINE inline __attribute__((always_inline))
#define BCOS_NOINLINE __attribute__((noinline))
#else
#define BCOS_FORCE_INLINE inline
#define BCOS_NOINLINE
#endif

enum class Isa { kBaseline, kAvx2, kAvx512 };

#if BCOS_HAVE_ISA_CLONES
template <typename Fn>
__attribute__((target("avx2,fma"), noinline)) void run_body_avx2(const Fn& body, int64_t begin, int64_t end) {
  body(begin, end);
}

template <typename Fn>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), noinline)) void run_body_avx512(
    const Fn& body, int64_t begin, int64_t end) {
  body(begin, end);
}

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
  return Isa::kBaseline;
}
#else
Isa detect_isa() { return Isa::kBaseline; }
#endif

// The ISA the kernels run with; BCOS_KERNELS_CPU_ISA=baseline|avx2|avx512
// lowers it (for tests and comparisons; it is never raised above the CPU's).
Isa kernel_isa() {
  static const Isa isa = [] {
    Isa best = detect_isa();
    const char* env = std::getenv("BCOS_KERNELS_CPU_ISA");
    if (env == nullptr) return best;
    const std::string want(env);
    Isa asked = best;
    if (want == "baseline") asked = Isa::kBaseline;
    if (want == "avx2") asked = Isa::kAvx2;
    if (want == "avx512") asked = Isa::kAvx512;
    return static_cast<int>(asked) < static_cast<int>(best) ? asked : best;
  }();
  return isa;
}

template <typename Fn>
BCOS_NOINLINE void run_body_baseline(const Fn& body, int64_t begin, int64_t end) {
  body(begin, end);
}

// kComputeBound: the body is arithmetic-heavy (the general-b power), so it
// uses AVX-512 where available; memory-bound bodies stop at AVX2, which
// measured faster for them (Sapphire Rapids: the b == 2 backward ran ~30%
// slower with 512-bit vectors).
template <bool kComputeBound = false, typename Fn>
void parallel_units(int64_t n, int64_t grain, const Fn& body) {
  const Isa isa = (!kComputeBound && kernel_isa() == Isa::kAvx512) ? Isa::kAvx2 : kernel_isa();
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
#if BCOS_HAVE_ISA_CLONES
    if (isa == Isa::kAvx512) {
      run_body_avx512(body, begin, end);
    } else if (isa == Isa::kAvx2) {
      run_body_avx2(body, begin, end);
    } else {
      run_body_baseline(body, begin, end);
    }
#else
    run_body_baseline(body, begin, end);
#endif
  });
}

// A zero-initialised scratch buffer aligned to 64 bytes, so that full-width
// vector loads and stores of a local buffer never straddle cache lines.
template <typename T>
class ScratchBuffer {
 public:
  explicit ScratchBuffer(int64_t n)
      : n_(static_cast<size_t>(std::max<int64_t>(n, 1))),
        ptr_(static_cast<T*>(::operator new[](n_ * sizeof(T), std::align_val_t(kAlign)))) {
    std::fill(ptr_, ptr_ + n_, T(0));
  }
  ~ScratchBuffer() { ::operator delete[](ptr_, std::align_val_t(kAlign)); }
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  T* data() { return ptr_; }
  T* begin() { return ptr_; }
  T* end() { return ptr_ + n_; }

 private:
  static constexpr size_t kAlign = 64;
  size_t n_;
  T* ptr_;
};

using bcos_checks::CpuDevice;

// ---------------------------------------------------------------------------
// Patch geometry.
// ---------------------------------------------------------------------------
struct Geometry {
  int64_t N, C, H, W, G, Cg, Ho, Wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
  // Length of a zero-padded row buffer holding input column w at index w + pw
  // and every tap j*sw + v*dw of every output column j.
  int64_t Wpad() const { return std::max(pw + W, (Wo - 1) * sw + (kw - 1) * dw + 1); }
};

using bcos_checks::acc_dtype;
using bcos_checks::use_channels_last;

// Passes over the positions p = h * W + w of NHWC x (the C channels of a
// position contiguous): fn(n, p) for every image n and position p, in units
// of kNhwcBlock positions.  fn is called from a unit body: declare it
// BCOS_UNIT_BODY.
constexpr int64_t kNhwcBlock = 64;

template <typename Fn>
void parallel_positions_nhwc(const Geometry& g, const Fn& fn) {
  const int64_t HW = g.H * g.W;
  const int64_t nblk = div_up(HW, kNhwcBlock);
  parallel_units(g.N * nblk, grain_for(g.C * kNhwcBlock), [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / nblk;
      const int64_t p0 = (u % nblk) * kNhwcBlock;
      const int64_t p1 = std::min(HW, p0 + kNhwcBlock);
      for (int64_t p = p0; p < p1; ++p) fn(n, p);
    }
  });
}

// ---------------------------------------------------------------------------
// patch_norm, pass 1: sq[n, g, h, w] = sum over the channels of group g of x^2.
// ---------------------------------------------------------------------------
template <typename scalar_t>
void sum_squares_nchw(const scalar_t* x, acc_type<scalar_t>* sq, const Geometry& g) {
  using acc_t = acc_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  constexpr int64_t kBlock = 2048;
  const int64_t nblk = div_up(HW, kBlock);
  parallel_units(g.N * g.G * nblk, grain_for(g.Cg * kBlock), [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t blk = u % nblk;
      const int64_t ng = u / nblk;  // n * G + group
      const int64_t n = ng / g.G;
      const int64_t grp = ng % g.G;
      const int64_t p0 = blk * kBlock;
      const int64_t len = std::min(kBlock, HW - p0);
      acc_t* dst = sq + ng * HW + p0;
      const scalar_t* src = x + (n * g.C + grp * g.Cg) * HW + p0;
      for (int64_t p = 0; p < len; ++p) {
        const acc_t v = static_cast<acc_t>(src[p]);
        dst[p] = v * v;
      }
      int64_t c = 1;
      for (; c + 3 < g.Cg; c += 4) {
        const scalar_t* s0 = src + c * HW;
        const scalar_t* s1 = s0 + HW;
        const scalar_t* s2 = s1 + HW;
        const scalar_t* s3 = s2 + HW;
        for (int64_t p = 0; p < len; ++p) {
          const acc_t v0 = static_cast<acc_t>(s0[p]);
          const acc_t v1 = static_cast<acc_t>(s1[p]);
          const acc_t v2 = static_cast<acc_t>(s2[p]);
          const acc_t v3 = static_cast<acc_t>(s3[p]);
          dst[p] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3);
        }
      }
      for (; c < g.Cg; ++c) {
        const scalar_t* s0 = src + c * HW;
        for (int64_t p = 0; p < len; ++p) {
          const acc_t v0 = static_cast<acc_t>(s0[p]);
          dst[p] += v0 * v0;
        }
      }
    }
  });
}

// Sum of squares of a contiguous run (8 independent lanes so that the loop
// vectorises without reassociating a single accumulator).
template <typename scalar_t>
BCOS_FORCE_INLINE acc_type<scalar_t> run_sum_squares(const scalar_t* src, int64_t len) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kLanes = 8;
  acc_t lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= len; c += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t v = static_cast<acc_t>(src[c + k]);
      lanes[k] += v * v;
    }
  }
  acc_t tail = 0;
  for (; c < len; ++c) {
    const acc_t v = static_cast<acc_t>(src[c]);
    tail += v * v;
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail;
}

template <typename scalar_t>
void sum_squares_nhwc(const scalar_t* x, acc_type<scalar_t>* sq, const Geometry& g) {
  const int64_t HW = g.H * g.W;
  parallel_positions_nhwc(g, [&](int64_t n, int64_t p) BCOS_UNIT_BODY {
    const scalar_t* px = x + (n * HW + p) * g.C;
    for (int64_t grp = 0; grp < g.G; ++grp) {
      sq[(n * g.G + grp) * HW + p] = run_sum_squares(px + grp * g.Cg, g.Cg);
    }
  });
}

// ---------------------------------------------------------------------------
// patch_norm, pass 2: norm[n, g, i, j] = sqrt(box sum of sq + eps).
// Column sums over the kh taps of output row i, then row sums over kw taps.
// ---------------------------------------------------------------------------
template <typename scalar_t>
void box_norm(const acc_type<scalar_t>* sq, scalar_t* norm, const Geometry& g) {
  using acc_t = acc_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  const int64_t Wpad = g.Wpad();
  parallel_units(g.N * g.G * g.Ho, grain_for(g.kh * g.W + g.kw * g.Wo), [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    ScratchBuffer<acc_t> colpad(Wpad);
    ScratchBuffer<acc_t> rowacc(g.Wo);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t i = u % g.Ho;
      const int64_t ng = u / g.Ho;
      const acc_t* plane = sq + ng * HW;
      std::fill(colpad.begin(), colpad.end(), acc_t(0));
      acc_t* col = colpad.data() + g.pw;
      for (int64_t a = 0; a < g.kh; ++a) {
        const int64_t h = i * g.sh - g.ph + a * g.dh;
        if (h < 0 || h >= g.H) continue;
        const acc_t* row = plane + h * g.W;
        for (int64_t w = 0; w < g.W; ++w) col[w] += row[w];
      }
      std::fill(rowacc.begin(), rowacc.end(), acc_t(0));
      acc_t* racc = rowacc.data();
      for (int64_t v = 0; v < g.kw; ++v) {
        const acc_t* src = colpad.data() + v * g.dw;
        if (g.sw == 1) {
          for (int64_t j = 0; j < g.Wo; ++j) racc[j] += src[j];
        } else {
          for (int64_t j = 0; j < g.Wo; ++j) racc[j] += src[j * g.sw];
        }
      }
      scalar_t* dst = norm + u * g.Wo;
      for (int64_t j = 0; j < g.Wo; ++j) dst[j] = static_cast<scalar_t>(bcos_math::patch_norm_value(racc[j]));
    }
  });
}

// ---------------------------------------------------------------------------
// patch_norm_backward.
//   q = grad_norm / norm                      (N, G, Ho, Wo)
//   T[i, w] = sum over taps v of q[i, j] with j*sw - pw + v*dw == w      (Ho, W per plane)
//   R[h, w] = sum over taps u of T[i, w] with i*sh - ph + u*dh == h      (N, G, H, W)
//   grad_x  = x * R[group of the channel]
// ---------------------------------------------------------------------------
// One unit per (n, g) plane (one parallel region for both passes; the
// planes are small next to the C-channel pass that follows).
template <typename scalar_t>
void scatter_planes(const scalar_t* grad_norm, const scalar_t* norm, acc_type<scalar_t>* R, const Geometry& g) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Wpad = g.Wpad();
  const int64_t work = g.Ho * (g.kw * g.Wo + g.W) + g.H * g.kh * g.W;
  parallel_units(g.N * g.G, grain_for(work), [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    ScratchBuffer<acc_t> tpad(Wpad);
    ScratchBuffer<acc_t> q(g.Wo);
    ScratchBuffer<acc_t> T(g.Ho * g.W);
    for (int64_t ng = begin; ng < end; ++ng) {
      // rows: T[i, :] from q[i, :]
      for (int64_t i = 0; i < g.Ho; ++i) {
        const scalar_t* gn = grad_norm + (ng * g.Ho + i) * g.Wo;
        const scalar_t* nm = norm + (ng * g.Ho + i) * g.Wo;
        acc_t* qv = q.data();
        for (int64_t j = 0; j < g.Wo; ++j) {
          qv[j] = bcos_math::patch_norm_grad_factor(static_cast<acc_t>(gn[j]), static_cast<acc_t>(nm[j]));
        }
        std::fill(tpad.begin(), tpad.end(), acc_t(0));
        for (int64_t v = 0; v < g.kw; ++v) {
          acc_t* dst = tpad.data() + v * g.dw;
          if (g.sw == 1) {
            for (int64_t j = 0; j < g.Wo; ++j) dst[j] += qv[j];
          } else {
            for (int64_t j = 0; j < g.Wo; ++j) dst[j * g.sw] += qv[j];
          }
        }
        std::copy(tpad.data() + g.pw, tpad.data() + g.pw + g.W, T.data() + i * g.W);
      }
      // columns: R[h, :] = sum of the T rows whose windows contain row h
      for (int64_t h = 0; h < g.H; ++h) {
        acc_t* dst = R + (ng * g.H + h) * g.W;
        std::fill(dst, dst + g.W, acc_t(0));
        for (int64_t a = 0; a < g.kh; ++a) {
          const int64_t t = h + g.ph - a * g.dh;  // = i * sh for a valid output row i
          if (t < 0 || t % g.sh != 0) continue;
          const int64_t i = t / g.sh;
          if (i >= g.Ho) continue;
          const acc_t* src = T.data() + i * g.W;
          for (int64_t w = 0; w < g.W; ++w) dst[w] += src[w];
        }
      }
    }
  });
}

// kAccumulate: gx += x * R (into the gradient the convolution's backward
// already wrote, saving a separate add pass), else gx = x * R.
template <bool kAccumulate, typename scalar_t, typename acc_t>
BCOS_FORCE_INLINE void store_product(scalar_t* dst, acc_t v) {
  if constexpr (kAccumulate) {
    *dst = static_cast<scalar_t>(static_cast<acc_t>(*dst) + v);
  } else {
    *dst = static_cast<scalar_t>(v);
  }
}

template <bool kAccumulate, typename scalar_t>
void mul_by_group_nchw(const scalar_t* x, const acc_type<scalar_t>* R, scalar_t* gx, const Geometry& g) {
  using acc_t = acc_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  constexpr int64_t kBlock = 4096;
  const int64_t nblk = div_up(HW, kBlock);
  parallel_units(g.N * g.C * nblk, grain_for(kBlock), [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t blk = u % nblk;
      const int64_t nc = u / nblk;
      const int64_t n = nc / g.C;
      const int64_t grp = (nc % g.C) / g.Cg;
      const int64_t p0 = blk * kBlock;
      const int64_t len = std::min(kBlock, HW - p0);
      const scalar_t* src = x + nc * HW + p0;
      const acc_t* r = R + (n * g.G + grp) * HW + p0;
      scalar_t* dst = gx + nc * HW + p0;
      for (int64_t p = 0; p < len; ++p) store_product<kAccumulate>(dst + p, static_cast<acc_t>(src[p]) * r[p]);
    }
  });
}

template <bool kAccumulate, typename scalar_t>
void mul_by_group_nhwc(const scalar_t* x, const acc_type<scalar_t>* R, scalar_t* gx, const Geometry& g) {
  using acc_t = acc_type<scalar_t>;
  const int64_t HW = g.H * g.W;
  parallel_positions_nhwc(g, [&](int64_t n, int64_t p) BCOS_UNIT_BODY {
    const scalar_t* src = x + (n * HW + p) * g.C;
    scalar_t* dst = gx + (n * HW + p) * g.C;
    for (int64_t grp = 0; grp < g.G; ++grp) {
      const acc_t r = R[(n * g.G + grp) * HW + p];
      const scalar_t* s = src + grp * g.Cg;
      scalar_t* d = dst + grp * g.Cg;
      for (int64_t c = 0; c < g.Cg; ++c) store_product<kAccumulate>(d + c, static_cast<acc_t>(s[c]) * r);
    }
  });
}

// ---------------------------------------------------------------------------
// bcos_scale_forward / backward: shared blocking.  Positions P are cut into
// blocks of kPosBlock (a unit of parallel work, fixed by the shape); the
// forward walks a block in tiles of kTile held in local arrays.
// ---------------------------------------------------------------------------
constexpr int64_t kPosBlock = 2048;

// Positions per unit of the backward (which walks the group's channels row by
// row over a block): whole rows where there are enough (image, group) units
// to share out, so that consecutive rows o, o + 1 are one sequential stream
// of memory (measured 1.7-2x faster than blocks that cut the rows, at
// 256 x 56 x 56); else blocks of kPosBlock.  A function of the shape only,
// never of the thread count, so the grad_b partial sums stay deterministic.
constexpr int64_t kMinRowUnits = 4;  // two per thread on a 2-core machine
constexpr int64_t kMaxRowBlock = 16384;

inline int64_t backward_pos_block(int64_t images_x_groups, int64_t P) {
  return (images_x_groups >= kMinRowUnits && P <= kMaxRowBlock) ? std::max<int64_t>(P, 1) : kPosBlock;
}
constexpr int64_t kTile = 256;

// A tile of the forward's MaxOut, in local arrays: the maxima lm and the
// winning units win of kTile outputs.
template <typename acc_t>
struct MaxOutTile {
  alignas(64) acc_t lm[kTile];
  alignas(64) int32_t win[kTile];

  // lin_max[i] and winner[i] of the tile's first len outputs.
  template <typename scalar_t>
  BCOS_FORCE_INLINE void store(int64_t len, scalar_t* lin_max, uint8_t* winner) const {
    for (int64_t i = 0; i < len; ++i) {
      lin_max[i] = static_cast<scalar_t>(lm[i]);
      winner[i] = static_cast<uint8_t>(win[i]);
    }
  }
};

// The forward epilogue's last step: times channel_scale[o] when the op got
// one (kChannelScale), else the value untouched -- not a multiply by 1, so
// the path without a factor is the same code as before it existed.
template <bool kChannelScale, typename acc_t, typename ChannelScaleAt>
BCOS_FORCE_INLINE acc_t finish_output(acc_t v, const ChannelScaleAt& channel_scale_at, int64_t p) {
  if constexpr (kChannelScale) {
    return bcos_math::apply_channel_scale(v, channel_scale_at(p));
  } else {
    (void)channel_scale_at;
    (void)p;
    return v;
  }
}

// out[p] = dynamic scale of lm[p] (MaxOut already applied) for p < len;
// norm_at(p) gives the norm of position p (a load, or one broadcast value),
// channel_scale_at(p) its output channel's factor (read only with
// kChannelScale).  x / 1 == x exactly: with scale == 1 the division by the
// scale is compiled out (a literal 1), otherwise it is kept, in the original
// order.
template <int kMode, bool kChannelScale, typename scalar_t, typename acc_t, typename NormAt, typename ChannelScaleAt>
BCOS_FORCE_INLINE void scale_forward_tile(const acc_t* lm, const NormAt& norm_at,
                                          const ChannelScaleAt& channel_scale_at, scalar_t* dst, int64_t len,
                                          acc_t bm1, acc_t scale, bool unit_scale) {
  auto apply = [&](auto unit) BCOS_UNIT_BODY {
    const acc_t s = decltype(unit)::value ? acc_t(1) : scale;
    if constexpr (kMode == bcos_math::kModeOne) {
      for (int64_t p = 0; p < len; ++p) {
        dst[p] = static_cast<scalar_t>(
            finish_output<kChannelScale>(bcos_math::scale_forward_one(lm[p], s), channel_scale_at, p));
      }
    } else if constexpr (kMode == bcos_math::kModeTwo) {
      for (int64_t p = 0; p < len; ++p) {
        dst[p] = static_cast<scalar_t>(
            finish_output<kChannelScale>(bcos_math::scale_forward_two(lm[p], norm_at(p), s), channel_scale_at, p));
      }
    } else {
      for (int64_t p = 0; p < len; ++p) {
        dst[p] = static_cast<scalar_t>(finish_output<kChannelScale>(
            bcos_math::scale_forward_general(lm[p], norm_at(p), bm1, s), channel_scale_at, p));
      }
    }
  };
  if (unit_scale) {
    apply(std::true_type{});
  } else {
    apply(std::false_type{});
  }
}

template <typename scalar_t, int kMode, bool kChannelScale>
void scale_forward_rows(const scalar_t* lin, const scalar_t* norm, const scalar_t* channel_scale, scalar_t* out,
                        scalar_t* lin_max, uint8_t* winner, int64_t N, int64_t O, int64_t M, int64_t G, double b,
                        double scale);

// channel_scale: (O,), read only with kChannelScale.
template <typename scalar_t, int kMode, bool kChannelScale>
void scale_forward_kernel(const scalar_t* lin, const scalar_t* norm, const scalar_t* channel_scale, scalar_t* out,
                          scalar_t* lin_max, uint8_t* winner, int64_t N, int64_t O, int64_t M, int64_t P, int64_t G,
                          double b, double scale) {
  if (P == 1) {
    scale_forward_rows<scalar_t, kMode, kChannelScale>(lin, norm, channel_scale, out, lin_max, winner, N, O, M, G, b,
                                                       scale);
    return;
  }
  using acc_t = acc_type<scalar_t>;
  const int64_t Og = (kMode == bcos_math::kModeOne) ? 1 : O / G;
  const int64_t nblk = div_up(P, kPosBlock);
  const acc_t bm1 = static_cast<acc_t>(b - 1.0);
  const acc_t sc = static_cast<acc_t>(scale);
  const bool unit_scale = scale == 1.0;
  constexpr bool kComputeBound = kMode == bcos_math::kModeGeneral;
  const int64_t grain = grain_for(kPosBlock * M);
  parallel_units<kComputeBound>(N * O * nblk, grain, [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    MaxOutTile<acc_t> tile;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t no = u / nblk;  // n * O + o
      const int64_t n = no / O;
      const int64_t o = no % O;
      const int64_t pb0 = (u % nblk) * kPosBlock;
      const int64_t pb1 = std::min(P, pb0 + kPosBlock);
      for (int64_t t0 = pb0; t0 < pb1; t0 += kTile) {
        const int64_t len = std::min(kTile, pb1 - t0);
        const scalar_t* l0 = lin + no * M * P + t0;
        for (int64_t p = 0; p < len; ++p) tile.lm[p] = static_cast<acc_t>(l0[p]);
        if (M > 1) {
          for (int64_t p = 0; p < len; ++p) tile.win[p] = 0;
          for (int64_t m = 1; m < M; ++m) {
            const scalar_t* lmr = l0 + m * P;
            const int32_t mi = static_cast<int32_t>(m);
            for (int64_t p = 0; p < len; ++p) {
              const acc_t v = static_cast<acc_t>(lmr[p]);
              const bool gt = v > tile.lm[p];  // strict: the first maximum wins
              tile.lm[p] = gt ? v : tile.lm[p];
              tile.win[p] = gt ? mi : tile.win[p];
            }
          }
          tile.store(len, lin_max + no * P + t0, winner + no * P + t0);
        }
        scalar_t* dst = out + no * P + t0;
        // A unit is one output channel: its factor is one value for the whole tile.
        const acc_t cv = kChannelScale ? static_cast<acc_t>(channel_scale[o]) : acc_t(1);
        auto channel_scale_at = [cv](int64_t) BCOS_UNIT_BODY { return cv; };
        if constexpr (kMode == bcos_math::kModeOne) {
          scale_forward_tile<kMode, kChannelScale>(tile.lm, [](int64_t) { return acc_t(1); }, channel_scale_at, dst, len,
                                                   bm1, sc, unit_scale);
        } else {
          const scalar_t* nr = norm + (n * G + o / Og) * P + t0;
          auto norm_at = [nr](int64_t p) BCOS_UNIT_BODY { return static_cast<acc_t>(nr[p]); };
          scale_forward_tile<kMode, kChannelScale>(tile.lm, norm_at, channel_scale_at, dst, len, bm1, sc, unit_scale);
        }
      }
    }
  });
}

// P == 1 (the linear layers pass lin (rows, O * M, 1)): the output channels
// are the contiguous dimension, so this version vectorises over them.  A unit
// is (row, norm group, block of the group's channels); the norm is one value.
template <typename scalar_t, int kMode, bool kChannelScale>
void scale_forward_rows(const scalar_t* lin, const scalar_t* norm, const scalar_t* channel_scale, scalar_t* out,
                        scalar_t* lin_max, uint8_t* winner, int64_t N, int64_t O, int64_t M, int64_t G, double b,
                        double scale) {
  using acc_t = acc_type<scalar_t>;
  const int64_t Gu = (kMode == bcos_math::kModeOne) ? 1 : G;
  const int64_t Og = O / Gu;
  const int64_t nblk = div_up(Og, kPosBlock);
  const acc_t bm1 = static_cast<acc_t>(b - 1.0);
  const acc_t sc = static_cast<acc_t>(scale);
  const bool unit_scale = scale == 1.0;
  constexpr bool kComputeBound = kMode == bcos_math::kModeGeneral;
  parallel_units<kComputeBound>(N * Gu * nblk, grain_for(kPosBlock * M), [&](int64_t begin, int64_t end)
                                    BCOS_UNIT_BODY {
    MaxOutTile<acc_t> tile;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t ng = u / nblk;  // row * Gu + group
      const int64_t n = ng / Gu;
      const int64_t grp = ng % Gu;
      const int64_t o0 = grp * Og + (u % nblk) * kPosBlock;
      const int64_t o1 = std::min(grp * Og + Og, o0 + kPosBlock);
      const acc_t nv = (kMode == bcos_math::kModeOne) ? acc_t(1) : static_cast<acc_t>(norm[ng]);
      for (int64_t t0 = o0; t0 < o1; t0 += kTile) {
        const int64_t len = std::min(kTile, o1 - t0);
        const scalar_t* l0 = lin + (n * O + t0) * M;
        const acc_t* lm = tile.lm;
        if (M == 1) {
          // fp32 lin is read in place: its copy into the tile compiles to a `rep movs` whose start-up cost, per
          // row of a channels_last conv, doubled the pass
          if constexpr (std::is_same_v<scalar_t, acc_t>) {
            lm = l0;
          } else {
            for (int64_t i = 0; i < len; ++i) tile.lm[i] = static_cast<acc_t>(l0[i]);
          }
        } else {
          for (int64_t i = 0; i < len; ++i) {
            acc_t best = static_cast<acc_t>(l0[i * M]);
            int32_t arg = 0;
            for (int64_t m = 1; m < M; ++m) {
              const acc_t v = static_cast<acc_t>(l0[i * M + m]);
              const bool gt = v > best;  // strict: the first maximum wins
              best = gt ? v : best;
              arg = gt ? static_cast<int32_t>(m) : arg;
            }
            tile.lm[i] = best;
            tile.win[i] = arg;
          }
          tile.store(len, lin_max + n * O + t0, winner + n * O + t0);
        }
        auto norm_at = [nv](int64_t) BCOS_UNIT_BODY { return nv; };
        // Here the tile runs over output channels t0 + i: the factor is a contiguous load.
        const scalar_t* cs = kChannelScale ? channel_scale + t0 : nullptr;
        auto channel_scale_at = [cs](int64_t i) BCOS_UNIT_BODY { return static_cast<acc_t>(cs[i]); };
        scale_forward_tile<kMode, kChannelScale>(lm, norm_at, channel_scale_at, out + n * O + t0, len, bm1, sc,
                                                 unit_scale);
      }
    }
  });
}

template <typename acc_t>
BCOS_FORCE_INLINE double lane_sum(const acc_t* v, int64_t len) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= len; p += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += v[p + k];
  }
  double s = 0.0;
  for (; p < len; ++p) s += static_cast<double>(v[p]);
  for (int k = 0; k < kLanes; ++k) s += static_cast<double>(lanes[k]);
  return s;
}

// P == 1 backward (see scale_forward_rows): a unit is (row, norm group) and
// reduces grad_norm over the group's channels in fixed-order lanes.
template <typename scalar_t, int kMode, bool kDetach, bool kNeedDn, bool kNeedDb>
void scale_backward_rows(const scalar_t* grad_out, const scalar_t* lin_max, const scalar_t* norm,
                         const uint8_t* winner, scalar_t* grad_lin, scalar_t* grad_norm,
                         std::vector<double>& partial_db, int64_t N, int64_t O, int64_t M, int64_t G, double b,
                         double scale) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kReadNorm = kMode != bcos_math::kModeOne;
  const int64_t Gu = kReadNorm ? G : 1;
  const int64_t Og = O / Gu;
  const acc_t bm1 = static_cast<acc_t>(b - 1.0);
  const acc_t inv_scale = static_cast<acc_t>(1.0 / scale);
  constexpr bool kComputeBound = kMode == bcos_math::kModeGeneral;
  parallel_units<kComputeBound>(N * Gu, grain_for(Og * (M + 2)), [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    alignas(64) acc_t dl[kTile];
    alignas(64) acc_t dn[kTile];
    alignas(64) acc_t db[kTile];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / Gu;
      const int64_t grp = u % Gu;
      const acc_t rn = kReadNorm ? acc_t(1) / static_cast<acc_t>(norm[u]) : acc_t(1);
      double dn_sum = 0.0;
      double db_sum = 0.0;
      for (int64_t t0 = grp * Og; t0 < (grp + 1) * Og; t0 += kTile) {
        const int64_t len = std::min(kTile, (grp + 1) * Og - t0);
        const scalar_t* go = grad_out + n * O + t0;
        const scalar_t* lmx = lin_max + n * O + t0;
        scalar_t* gl = grad_lin + (n * O + t0) * M;
        // Without MaxOut the gradient goes straight to grad_lin: a copy of the tile per row compiles to a `rep
        // movs` whose start-up cost made the channels_last convs' backward 2.6x slower than the NCHW one.
        auto grads_into = [&](auto* dst) BCOS_UNIT_BODY {
          using dst_t = std::remove_pointer_t<decltype(dst)>;
          if constexpr (kMode == bcos_math::kModeOne) {
            for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<dst_t>(static_cast<acc_t>(go[i]) * inv_scale);
          } else {
            for (int64_t i = 0; i < len; ++i) {
              const acc_t l = static_cast<acc_t>(lmx[i]);
              const acc_t gv = static_cast<acc_t>(go[i]);
              const bcos_math::ScaleGrads<acc_t> d =
                  bcos_math::scale_grads_of<kMode, kDetach>(l, rn, bm1, inv_scale);
              dst[i] = static_cast<dst_t>(gv * d.dl);
              if constexpr (kNeedDn) dn[i] = gv * d.dn;
              if constexpr (kNeedDb) db[i] = gv * d.db;
            }
            if constexpr (kNeedDn) dn_sum += lane_sum(dn, len);
            if constexpr (kNeedDb) db_sum += lane_sum(db, len);
          }
        };
        if (M == 1) {
          grads_into(gl);
        } else {
          grads_into(dl);
          const uint8_t* wn = winner + n * O + t0;
          for (int64_t i = 0; i < len; ++i) {
            for (int64_t m = 0; m < M; ++m) {
              gl[i * M + m] = static_cast<scalar_t>(wn[i] == static_cast<uint8_t>(m) ? dl[i] : acc_t(0));
            }
          }
        }
      }
      if constexpr (kNeedDn) grad_norm[u] = static_cast<scalar_t>(dn_sum);
      if constexpr (kNeedDb) partial_db[u] = db_sum;
    }
  });
}

// One unit = (n, norm group, block of positions): every output channel of the
// group is walked row by row over the whole block (long contiguous streams),
// grad_norm of the block is accumulated in a local buffer and written once.
template <typename scalar_t, int kMode, bool kDetach, bool kNeedDn, bool kNeedDb>
void scale_backward_kernel(const scalar_t* grad_out, const scalar_t* lin_max, const scalar_t* norm,
                           const uint8_t* winner, scalar_t* grad_lin, scalar_t* grad_norm,
                           std::vector<double>& partial_db, int64_t N, int64_t O, int64_t M, int64_t P, int64_t G,
                           double b, double scale) {
  if (P == 1) {
    scale_backward_rows<scalar_t, kMode, kDetach, kNeedDn, kNeedDb>(grad_out, lin_max, norm, winner, grad_lin,
                                                                   grad_norm, partial_db, N, O, M, G, b, scale);
    return;
  }
  using acc_t = acc_type<scalar_t>;
  constexpr bool kReadNorm = kMode != bcos_math::kModeOne;
  const int64_t Gu = kReadNorm ? G : 1;  // the one mode has no norm: a single group
  const int64_t Og = O / Gu;
  const int64_t block = backward_pos_block(N * Gu, P);
  const int64_t nblk = div_up(P, block);
  const acc_t bm1 = static_cast<acc_t>(b - 1.0);
  const acc_t inv_scale = static_cast<acc_t>(1.0 / scale);
  constexpr bool kComputeBound = kMode == bcos_math::kModeGeneral;
  const int64_t grain = grain_for(block * Og * (M + 2));
  parallel_units<kComputeBound>(N * Gu * nblk, grain, [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    ScratchBuffer<acc_t> buffers(4 * block);
    acc_t* dl = buffers.data();
    acc_t* dn = dl + block;
    acc_t* db = dn + block;
    acc_t* inv_n = db + block;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t ng = u / nblk;  // n * Gu + group
      const int64_t n = ng / Gu;
      const int64_t grp = ng % Gu;
      const int64_t p0 = (u % nblk) * block;
      const int64_t len = std::min(block, P - p0);
      double db_sum = 0.0;
      if constexpr (kNeedDn) std::fill(dn, dn + len, acc_t(0));
      if constexpr (kReadNorm) {
        // 1 / n once per position, shared by the Og channels of the group
        const scalar_t* nr = norm + ng * P + p0;
        for (int64_t p = 0; p < len; ++p) inv_n[p] = acc_t(1) / static_cast<acc_t>(nr[p]);
      }
      for (int64_t o = grp * Og; o < (grp + 1) * Og; ++o) {
        const int64_t no = n * O + o;
        const scalar_t* go = grad_out + no * P + p0;
        const scalar_t* lmx = lin_max + no * P + p0;
        // d out / d l times grad_out, into grad_lin directly (M == 1) or into dl
        // and then routed to the MaxOut winner.
        auto grads_into = [&](auto* dst) BCOS_UNIT_BODY {
          using dst_t = std::remove_pointer_t<decltype(dst)>;
          if constexpr (kMode == bcos_math::kModeOne) {
            for (int64_t p = 0; p < len; ++p) dst[p] = static_cast<dst_t>(static_cast<acc_t>(go[p]) * inv_scale);
          } else {
            for (int64_t p = 0; p < len; ++p) {
              const acc_t l = static_cast<acc_t>(lmx[p]);
              const acc_t rn = inv_n[p];
              const acc_t gv = static_cast<acc_t>(go[p]);
              const bcos_math::ScaleGrads<acc_t> d =
                  bcos_math::scale_grads_of<kMode, kDetach>(l, rn, bm1, inv_scale);
              dst[p] = static_cast<dst_t>(gv * d.dl);
              if constexpr (kNeedDn) dn[p] += gv * d.dn;
              if constexpr (kNeedDb) db[p] = gv * d.db;
            }
            if constexpr (kNeedDb) db_sum += lane_sum(db, len);
          }
        };
        if (M == 1) {
          grads_into(grad_lin + no * P + p0);
        } else {
          grads_into(dl);
          // Every element of grad_lin is written once: dl at the winner, 0 elsewhere.
          const uint8_t* wn = winner + no * P + p0;
          for (int64_t m = 0; m < M; ++m) {
            scalar_t* gl = grad_lin + (no * M + m) * P + p0;
            const uint8_t mu = static_cast<uint8_t>(m);
            for (int64_t p = 0; p < len; ++p) gl[p] = static_cast<scalar_t>(wn[p] == mu ? dl[p] : acc_t(0));
          }
        }
      }
      if constexpr (kNeedDn) {
        scalar_t* gn = grad_norm + ng * P + p0;
        for (int64_t p = 0; p < len; ++p) gn[p] = static_cast<scalar_t>(dn[p]);
      }
      if constexpr (kNeedDb) partial_db[u] = db_sum;
    }
  });
}

// ---------------------------------------------------------------------------
// Weight normalisation w_hat = w / ||w|| per filter, and its backward
// (g - w_hat <g, w_hat>) / ||w||.  A filter is one contiguous block of K
// elements in NCHW and in channels_last weights alike (only the order inside
// it differs, and neither formula depends on it), so both walk O rows of K.
// One pass over memory each way: a row is read again from cache.
// ---------------------------------------------------------------------------
template <typename acc_t, typename A, typename B>
BCOS_FORCE_INLINE double row_dot(const A* a, const B* b, int64_t len) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes) {
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<acc_t>(a[k + j]) * static_cast<acc_t>(b[k + j]);
  }
  double s = 0.0;
  for (; k < len; ++k) s += static_cast<double>(static_cast<acc_t>(a[k]) * static_cast<acc_t>(b[k]));
  for (int j = 0; j < kLanes; ++j) s += static_cast<double>(lanes[j]);
  return s;
}

template <typename scalar_t>
void normalize_rows(const scalar_t* w, scalar_t* w_hat, scalar_t* norm, int64_t O, int64_t K) {
  using acc_t = acc_type<scalar_t>;
  parallel_units(O, grain_for(2 * K), [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    for (int64_t o = begin; o < end; ++o) {
      const scalar_t* r = w + o * K;
      // Rounded to the weight's dtype before dividing, as weight / norm does in that dtype.
      const scalar_t nv = static_cast<scalar_t>(std::sqrt(row_dot<acc_t>(r, r, K)));
      const acc_t n = static_cast<acc_t>(nv);
      scalar_t* dst = w_hat + o * K;
      for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<scalar_t>(static_cast<acc_t>(r[k]) / n);
      norm[o] = nv;
    }
  });
}

template <typename scalar_t>
void normalize_rows_backward(const scalar_t* grad, const scalar_t* w_hat, const scalar_t* norm, scalar_t* grad_w,
                             int64_t O, int64_t K) {
  using acc_t = acc_type<scalar_t>;
  parallel_units(O, grain_for(3 * K), [&](int64_t begin, int64_t end) BCOS_UNIT_BODY {
    for (int64_t o = begin; o < end; ++o) {
      const scalar_t* g = grad + o * K;
      const scalar_t* wh = w_hat + o * K;
      const acc_t dot = static_cast<acc_t>(row_dot<acc_t>(g, wh, K));
      const acc_t n = static_cast<acc_t>(norm[o]);
      scalar_t* dst = grad_w + o * K;
      for (int64_t k = 0; k < K; ++k) {
        dst[k] = static_cast<scalar_t>((static_cast<acc_t>(g[k]) - static_cast<acc_t>(wh[k]) * dot) / n);
      }
    }
  });
}

}  // namespace

// ===========================================================================
// Op entry points.
// ===========================================================================
at::Tensor patch_norm(const at::Tensor& x_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Geometry g = bcos_checks::check_patch_norm_args<CpuDevice, Geometry>(x_in, kernel_size, stride, padding,
                                                                             dilation, groups);
  const bool cl = use_channels_last(x_in);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  at::Tensor norm = at::empty({g.N, g.G, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (norm.numel() == 0) return norm;
  at::Tensor sq = at::empty({g.N, g.G, g.H, g.W}, x.options().dtype(acc_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bcos_patch_norm", [&] {
    using acc_t = acc_type<scalar_t>;
    acc_t* sqp = sq.data_ptr<acc_t>();
    if (g.C == 0) {
      std::fill(sqp, sqp + sq.numel(), acc_t(0));
    } else if (cl) {
      sum_squares_nhwc(x.const_data_ptr<scalar_t>(), sqp, g);
    } else {
      sum_squares_nchw(x.const_data_ptr<scalar_t>(), sqp, g);
    }
    box_norm(static_cast<const acc_t*>(sqp), norm.data_ptr<scalar_t>(), g);
  });
  return norm;
}

namespace {

// grad_x (= or += with kAccumulate) x * R, R the transposed box sum of grad_norm / norm; grad_x in the layout
// the kernels read x in.
template <bool kAccumulate>
void patch_norm_backward_into(at::Tensor& grad_x, const at::Tensor& grad_norm_in, const at::Tensor& x,
                              const at::Tensor& norm_in, const Geometry& g, bool cl) {
  const at::Tensor grad_norm = grad_norm_in.contiguous();
  const at::Tensor norm = norm_in.contiguous();
  at::Tensor R = at::empty({g.N, g.G, g.H, g.W}, x.options().dtype(acc_dtype(x.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bcos_patch_norm_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    scatter_planes(grad_norm.const_data_ptr<scalar_t>(), norm.const_data_ptr<scalar_t>(), R.data_ptr<acc_t>(), g);
    const acc_t* r = static_cast<const acc_t*>(R.data_ptr<acc_t>());
    if (cl) {
      mul_by_group_nhwc<kAccumulate>(x.const_data_ptr<scalar_t>(), r, grad_x.data_ptr<scalar_t>(), g);
    } else {
      mul_by_group_nchw<kAccumulate>(x.const_data_ptr<scalar_t>(), r, grad_x.data_ptr<scalar_t>(), g);
    }
  });
}

}  // namespace

at::Tensor patch_norm_backward(const at::Tensor& grad_norm_in, const at::Tensor& x_in, const at::Tensor& norm_in,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  const Geometry g = bcos_checks::check_patch_norm_backward_args<CpuDevice, Geometry>(
      grad_norm_in, x_in, norm_in, kernel_size, stride, padding, dilation, groups);
  const bool cl = use_channels_last(x_in);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  const auto grad_x_format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor grad_x = at::empty(x.sizes(), x.options().memory_format(grad_x_format));
  if (grad_x.numel() == 0) return grad_x;
  patch_norm_backward_into<false>(grad_x, grad_norm_in, x, norm_in, g, cl);
  return grad_x;
}

void patch_norm_backward_add_(at::Tensor& grad_x, const at::Tensor& grad_norm_in, const at::Tensor& x_in,
                              const at::Tensor& norm_in, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const Geometry g = bcos_checks::check_patch_norm_backward_args<CpuDevice, Geometry>(
      grad_norm_in, x_in, norm_in, kernel_size, stride, padding, dilation, groups);
  const bool cl = use_channels_last(x_in);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  TORCH_CHECK(grad_x.sizes() == x.sizes() && grad_x.scalar_type() == x.scalar_type() && grad_x.device() == x.device(),
              "patch_norm_backward_add_: grad_x must have the shape, dtype and device of x, got ", grad_x.sizes(),
              " ", grad_x.scalar_type(), " for x ", x.sizes(), " ", x.scalar_type());
  const auto format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(grad_x.is_contiguous(format), "patch_norm_backward_add_: grad_x must be ",
              cl ? "channels_last" : "contiguous", " like the layout x is read in");
  if (grad_x.numel() == 0) return;
  patch_norm_backward_into<true>(grad_x, grad_norm_in, x, norm_in, g, cl);
}

namespace {

// The O filters of a weight as rows of K elements (the filter block is contiguous in NCHW and channels_last).
std::pair<int64_t, int64_t> weight_rows(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.dim() >= 2, name, " must have at least 2 dimensions (out_features, ...), got ", w.dim());
  TORCH_CHECK(w.is_floating_point(), name, " must be a floating point tensor, got ", w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), name, " must be on the CPU, got ", w.device());
  const int64_t O = w.size(0);
  return {O, O == 0 ? 0 : w.numel() / O};
}

// w itself if each filter is one contiguous block of K elements (contiguous or channels_last), else a copy.
at::Tensor filter_blocks(const at::Tensor& w) {
  if (w.is_contiguous()) return w;
  if (w.dim() == 4 && w.is_contiguous(at::MemoryFormat::ChannelsLast)) return w;
  return w.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> weight_normalize(const at::Tensor& weight_in) {
  const auto [O, K] = weight_rows(weight_in, "weight");
  const at::Tensor weight = filter_blocks(weight_in);
  at::Tensor w_hat = at::empty_like(weight);  // keeps the layout
  std::vector<int64_t> norm_shape(weight.dim(), 1);
  norm_shape[0] = O;
  at::Tensor norm = at::empty(norm_shape, weight.options().memory_format(at::MemoryFormat::Contiguous));
  if (weight.numel() == 0) {
    norm.zero_();
    return {w_hat, norm};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "bcos_weight_normalize", [&] {
    normalize_rows(weight.const_data_ptr<scalar_t>(), w_hat.data_ptr<scalar_t>(), norm.data_ptr<scalar_t>(), O, K);
  });
  return {w_hat, norm};
}

at::Tensor weight_normalize_backward(const at::Tensor& grad_w_hat_in, const at::Tensor& w_hat_in,
                                     const at::Tensor& norm_in) {
  const auto [O, K] = weight_rows(w_hat_in, "w_hat");
  TORCH_CHECK(grad_w_hat_in.sizes() == w_hat_in.sizes() && grad_w_hat_in.scalar_type() == w_hat_in.scalar_type(),
              "weight_normalize_backward: grad_w_hat must have the shape and dtype of w_hat, got ",
              grad_w_hat_in.sizes(), " ", grad_w_hat_in.scalar_type(), " for ", w_hat_in.sizes(), " ",
              w_hat_in.scalar_type());
  TORCH_CHECK(norm_in.numel() == O && norm_in.scalar_type() == w_hat_in.scalar_type(),
              "weight_normalize_backward: norm must hold one value per filter (", O, ") in w_hat's dtype, got ",
              norm_in.numel(), " ", norm_in.scalar_type());
  const at::Tensor w_hat = filter_blocks(w_hat_in);
  // grad in w_hat's layout so that element k of a row means the same weight in both.
  const at::Tensor grad = w_hat.is_contiguous() ? grad_w_hat_in.contiguous()
                                                : grad_w_hat_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor norm = norm_in.contiguous();
  at::Tensor grad_w = at::empty_like(w_hat);
  if (grad_w.numel() == 0) return grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w_hat.scalar_type(), "bcos_weight_normalize_backward",
                                  [&] {
                                    normalize_rows_backward(grad.const_data_ptr<scalar_t>(),
                                                            w_hat.const_data_ptr<scalar_t>(),
                                                            norm.const_data_ptr<scalar_t>(),
                                                            grad_w.data_ptr<scalar_t>(), O, K);
                                  });
  return grad_w;
}

namespace {

struct ScaleShapes {
  int64_t N, O, M, P, G;
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> bcos_scale_forward(const at::Tensor& lin_in, const at::Tensor& norm_in,
                                                                  double b, bool b_is_tensor, int64_t max_out,
                                                                  double scale,
                                                                  const std::optional<at::Tensor>& channel_scale_in) {
  const int mode = bcos_math::scale_mode(b, b_is_tensor);
  const auto s = bcos_checks::check_scale_args<CpuDevice, ScaleShapes>("lin", lin_in, max_out, norm_in, mode,
                                                                       max_out, scale);
  const at::Tensor channel_scale = bcos_checks::check_channel_scale(channel_scale_in, lin_in, s.O);
  const bool has_cs = channel_scale.defined();
  const at::Tensor lin = lin_in.contiguous();
  const at::Tensor norm = mode == bcos_math::kModeOne ? norm_in : norm_in.contiguous();
  auto [out, lin_max, winner] = bcos_checks::scale_forward_outputs(lin, s);
  if (out.numel() == 0) return {out, lin_max, winner};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, lin.scalar_type(), "bcos_scale_forward", [&] {
    const scalar_t* lp = lin.const_data_ptr<scalar_t>();
    const scalar_t* np = mode == bcos_math::kModeOne ? nullptr : norm.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    scalar_t* mp = s.M > 1 ? lin_max.data_ptr<scalar_t>() : nullptr;
    uint8_t* wp = s.M > 1 ? winner.data_ptr<uint8_t>() : nullptr;
    const scalar_t* cp = has_cs ? channel_scale.const_data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto mode_c, auto cs_c) {
      scale_forward_kernel<scalar_t, decltype(mode_c)::value, decltype(cs_c)::value>(lp, np, cp, op, mp, wp, s.N, s.O,
                                                                                      s.M, s.P, s.G, b, scale);
    };
    // The factor is a compile-time choice: without one the kernels are those of before it existed.
    auto run_mode = [&](auto mode_c) {
      if (has_cs) {
        run(mode_c, std::true_type{});
      } else {
        run(mode_c, std::false_type{});
      }
    };
    if (mode == bcos_math::kModeOne) {
      run_mode(std::integral_constant<int, bcos_math::kModeOne>{});
    } else if (mode == bcos_math::kModeTwo) {
      run_mode(std::integral_constant<int, bcos_math::kModeTwo>{});
    } else {
      run_mode(std::integral_constant<int, bcos_math::kModeGeneral>{});
    }
  });
  return {out, lin_max, winner};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bcos_scale_backward(
    const at::Tensor& grad_out_in, const at::Tensor& lin_max_in, const at::Tensor& norm_in,
    const at::Tensor& winner_in, double b, bool b_is_tensor, int64_t max_out, double scale, bool detach,
    bool need_grad_norm, bool need_grad_b) {
  const int mode = bcos_math::scale_mode(b, b_is_tensor);
  const auto s = bcos_checks::check_scale_args<CpuDevice, ScaleShapes>("lin_max", lin_max_in, 1, norm_in, mode,
                                                                       max_out, scale);
  bcos_checks::check_scale_backward_args<CpuDevice>(grad_out_in, lin_max_in, winner_in, s.M);
  const bcos_checks::ScaleBackwardTensors t = bcos_checks::scale_backward_tensors(
      grad_out_in, lin_max_in, norm_in, winner_in, s, mode, detach, need_grad_norm, need_grad_b);
  if (t.grad_lin.numel() == 0) return t.outputs();
  const bool need_dn = t.need_dn;
  const bool need_db = t.need_db;
  const int64_t norm_units = s.N * (mode == bcos_math::kModeOne ? 1 : s.G);
  const int64_t nunits = norm_units * div_up(s.P, backward_pos_block(norm_units, s.P));
  std::vector<double> partial_db(need_db ? nunits : 0, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.grad_out.scalar_type(), "bcos_scale_backward", [&] {
    const scalar_t* gp = t.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* lp = t.lin_max.const_data_ptr<scalar_t>();
    const scalar_t* np = mode == bcos_math::kModeOne ? nullptr : t.norm.const_data_ptr<scalar_t>();
    const uint8_t* wp = s.M > 1 ? t.winner.const_data_ptr<uint8_t>() : nullptr;
    scalar_t* glp = t.grad_lin.data_ptr<scalar_t>();
    scalar_t* gnp = need_dn ? t.grad_norm.data_ptr<scalar_t>() : nullptr;
    bcos_math::dispatch_scale_backward(mode, detach, need_dn, need_db, [&](auto mode_c, auto detach_c, auto dn_c,
                                                                           auto db_c) {
      scale_backward_kernel<scalar_t, decltype(mode_c)::value, decltype(detach_c)::value, decltype(dn_c)::value,
                            decltype(db_c)::value>(gp, lp, np, wp, glp, gnp, partial_db, s.N, s.O, s.M, s.P, s.G, b,
                                                   scale);
    });
  });
  if (need_db) {
    double total = 0.0;  // ordered combine of the per-unit partial sums
    for (double v : partial_db) total += v;
    t.grad_b.fill_(total);
  }
  return t.outputs();
}

}  // namespace cpu
}  // namespace bcos_kernels
