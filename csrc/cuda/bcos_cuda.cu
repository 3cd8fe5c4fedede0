// CUDA kernels of the B-cos ops; the same semantics as the CPU kernels
// (csrc/cpu/bcos_cpu.cpp) and the same scalar math (csrc/common/bcos_math.h).
//
//   patch_norm           : channel sums of squares (sq) -> box sum -> sqrt
//   patch_norm_backward  : R = box sum of grad_norm / norm (transposed) -> x * R
//   bcos_scale_forward   : MaxOut + dynamic scale (+ optional per-channel factor), one pass over lin
//   bcos_conv_scale_forward : the same with the norms computed from sq in the pass
//   bcos_scale_backward  : grads w.r.t. lin, norm and b, one pass over grad_out
//
// Summation orders follow the CPU kernels where they are cheap to follow
// (box sums: over kernel rows inside, kernel columns outside); the last bits
// can still differ where the compiler fuses multiply-adds.
#include "common/bcos_math.h"
#include "cuda/cuda_common.cuh"

namespace bcos_kernels {
namespace cuda {
namespace {

using namespace detail;

// ---------------------------------------------------------------------------
// Patch norm.
// ---------------------------------------------------------------------------

// Digits of t in the mixed radix (d0 fastest, d1, d2) and the rest.
struct Digits {
  int64_t i0, i1, i2, rest;
};

__device__ __forceinline__ Digits digits(int64_t t, int64_t d0, int64_t d1, int64_t d2) {
  Digits d;
  d.i0 = t % d0;
  t /= d0;
  d.i1 = t % d1;
  t /= d1;
  d.i2 = t % d2;
  d.rest = t / d2;
  return d;
}

// (n, c, h, w) of element t of an (N, C, H, W) iteration: w fastest (NCHW
// order), or c fastest (NHWC order) with channels_last.
struct Index4 {
  int64_t n, c, h, w;
};

__device__ __forceinline__ Index4 unflatten(int64_t t, int64_t C, int64_t H, int64_t W, bool channels_last) {
  if (channels_last) {
    const Digits d = digits(t, C, W, H);
    return Index4{d.rest, d.i0, d.i2, d.i1};
  }
  const Digits d = digits(t, W, H, C);
  return Index4{d.rest, d.i2, d.i1, d.i0};
}

// sq[n, g, h, w] = sum over the channels c of group g of x[n, c, h, w]^2.
// Iterates (n, g, h, w) with w fastest, or (n, h, w, g) with g fastest for
// channels_last x, so that neighbouring threads read neighbouring memory.
template <typename T>
__global__ void sum_squares_kernel(const T* __restrict__ x, Strides4 xs, PatchGeometry g, bool channels_last,
                                   acc_t<T>* __restrict__ sq) {
  using A = acc_t<T>;
  const int64_t total = g.N * g.G * g.H * g.W;
  for (int64_t idx = grid_stride_begin(); idx < total; idx += grid_stride_step()) {
    const auto [n, grp, h, w] = unflatten(idx, g.G, g.H, g.W, channels_last);
    const T* px = x + n * xs.n + grp * g.Cg * xs.c + h * xs.h + w * xs.w;
    A acc = A(0);
    for (int64_t c = 0; c < g.Cg; ++c) {
      const A v = IO<T>::load(px[c * xs.c]);
      acc += v * v;
    }
    sq[((n * g.G + grp) * g.H + h) * g.W + w] = acc;
  }
}

// Box sum of one (n, g) plane of sq over the taps of output (i, j):
// kernel rows summed inside, kernel columns outside (the CPU order).
template <typename A>
__device__ __forceinline__ A box_sum(const A* __restrict__ plane, const PatchGeometry& g, int64_t i, int64_t j) {
  A acc = A(0);
  for (int64_t v = 0; v < g.kw; ++v) {
    const int64_t w = j * g.sw - g.pw + v * g.dw;
    if (w < 0 || w >= g.W) continue;
    A col = A(0);
    for (int64_t a = 0; a < g.kh; ++a) {
      const int64_t h = i * g.sh - g.ph + a * g.dh;
      if (h < 0 || h >= g.H) continue;
      col += plane[h * g.W + w];
    }
    acc += col;
  }
  return acc;
}

template <typename T>
__global__ void box_norm_kernel(const acc_t<T>* __restrict__ sq, PatchGeometry g, T* __restrict__ norm) {
  const int64_t total = g.N * g.G * g.Ho * g.Wo;
  for (int64_t idx = grid_stride_begin(); idx < total; idx += grid_stride_step()) {
    const int64_t j = idx % g.Wo;
    const int64_t i = (idx / g.Wo) % g.Ho;
    const int64_t ng = idx / (g.Wo * g.Ho);
    const auto sum = box_sum(sq + ng * g.H * g.W, g, i, j);
    norm[idx] = IO<T>::store(bcos_math::patch_norm_value(sum));
  }
}

// R[n, g, h, w] = sum over the outputs (i, j) whose patch contains (h, w) of
// grad_norm / norm: kernel columns inside, kernel rows outside (the CPU order).
template <typename T>
__global__ void scatter_norm_grad_kernel(const T* __restrict__ grad_norm, const T* __restrict__ norm,
                                         PatchGeometry g, acc_t<T>* __restrict__ R) {
  using A = acc_t<T>;
  const int64_t total = g.N * g.G * g.H * g.W;
  for (int64_t idx = grid_stride_begin(); idx < total; idx += grid_stride_step()) {
    const int64_t w = idx % g.W;
    const int64_t h = (idx / g.W) % g.H;
    const int64_t ng = idx / (g.W * g.H);
    const T* gn = grad_norm + ng * g.Ho * g.Wo;
    const T* nm = norm + ng * g.Ho * g.Wo;
    A acc = A(0);
    for (int64_t a = 0; a < g.kh; ++a) {
      const int64_t th = h + g.ph - a * g.dh;  // == i * sh for a valid output row i
      if (th < 0 || th % g.sh != 0) continue;
      const int64_t i = th / g.sh;
      if (i >= g.Ho) continue;
      A row = A(0);
      for (int64_t v = 0; v < g.kw; ++v) {
        const int64_t tw = w + g.pw - v * g.dw;
        if (tw < 0 || tw % g.sw != 0) continue;
        const int64_t j = tw / g.sw;
        if (j >= g.Wo) continue;
        row += bcos_math::patch_norm_grad_factor(IO<T>::load(gn[i * g.Wo + j]), IO<T>::load(nm[i * g.Wo + j]));
      }
      acc += row;
    }
    R[idx] = acc;
  }
}

// grad_x = x * R[group of the channel], iterated in the memory order of the
// output (NCHW or NHWC).
template <typename T>
__global__ void mul_by_group_kernel(const T* __restrict__ x, Strides4 xs, const acc_t<T>* __restrict__ R,
                                    PatchGeometry g, bool channels_last, T* __restrict__ gx, Strides4 gs) {
  const int64_t total = g.N * g.C * g.H * g.W;
  for (int64_t idx = grid_stride_begin(); idx < total; idx += grid_stride_step()) {
    const auto [n, c, h, w] = unflatten(idx, g.C, g.H, g.W, channels_last);
    const auto r = R[((n * g.G + c / g.Cg) * g.H + h) * g.W + w];
    const auto v = IO<T>::load(x[n * xs.n + c * xs.c + h * xs.h + w * xs.w]);
    gx[n * gs.n + c * gs.c + h * gs.h + w * gs.w] = IO<T>::store(v * r);
  }
}

// ---------------------------------------------------------------------------
// Dynamic scale.  A block works on one unit = (n, norm group, tile of TP
// positions) at a time (scale_grid): threadIdx.x walks the positions of the
// tile (TP = 32 when P >= 32: coalesced rows), threadIdx.y the output channels
// of the group (TY = 256 / TP of them in parallel, each thread every TY-th channel).
// ---------------------------------------------------------------------------
dim3 block_of(const ScaleGrid& l) { return dim3(l.block_x, l.block_y, 1); }

// The forward value in each mode (b - 1 and 1 / scale precomputed by the caller).
template <int kMode, typename A>
__device__ __forceinline__ A scale_value(A l, A n, A bm1, A scale) {
  if constexpr (kMode == bcos_math::kModeOne) {
    return bcos_math::scale_forward_one(l, scale);
  } else if constexpr (kMode == bcos_math::kModeTwo) {
    return bcos_math::scale_forward_two(l, n, scale);
  } else {
    return bcos_math::scale_forward_general(l, n, bm1, scale);
  }
}

// The shapes, b and scale of the scale kernels, and their tiling (scale_grid).
struct ScaleDims {
  int64_t N, O, M, P, G, ptiles, units;
  double b, scale;
};

ScaleDims scale_dims(const ScaleProblem& s) {
  const ScaleGrid l = scale_grid(s);
  return ScaleDims{s.N, s.O, s.M, s.P, s.G, l.ptiles, l.units, s.b, s.scale};
}

// Where the thread's block is in the scale pass: unit = (n, group, tile of
// positions) -> ng = n * groups + grp and the thread's position p.
struct ScaleUnit {
  int64_t ng, n, grp, p;
  bool active;  // p < P
};

__device__ __forceinline__ ScaleUnit scale_unit(const ScaleDims& a, int64_t unit, int64_t groups, int tp) {
  ScaleUnit u;
  u.ng = unit / a.ptiles;
  u.n = u.ng / groups;
  u.grp = u.ng % groups;
  u.p = (unit % a.ptiles) * blockDim.x + tp;
  u.active = u.p < a.P;
  return u;
}

struct ScaleForwardTensors {
  const void* lin;
  const void* norm;  // read (not kNormFromSq)
  const void* sq;    // kNormFromSq only: channel sums of squares
  void* norm_out;    // kNormFromSq only: the norms computed in the pass
  void* out;
  void* lin_max;
  uint8_t* winner;
  const void* channel_scale;  // kChannelScale only: (O,) factors of out
};

struct ScaleForwardArgs : ScaleForwardTensors, ScaleDims {
  PatchGeometry geom;  // kNormFromSq only
};

// kChannelScale: out[n, o, p] times channel_scale[o] (a template flag, so the
// kernels without a factor are unchanged, not multiplying by 1).
template <typename T, int kMode, bool kNormFromSq, bool kChannelScale>
__global__ void __launch_bounds__(kThreads) scale_forward_kernel(ScaleForwardArgs a) {
  using A = acc_t<T>;
  const T* __restrict__ lin = static_cast<const T*>(a.lin);
  T* __restrict__ out = static_cast<T*>(a.out);
  T* __restrict__ lin_max = static_cast<T*>(a.lin_max);
  const int64_t groups = kMode == bcos_math::kModeOne ? 1 : a.G;
  const int64_t per_group = a.O / groups;
  const A bm1 = static_cast<A>(a.b - 1.0);
  const A sc = static_cast<A>(a.scale);
  const int tp = threadIdx.x;
  const int ty = threadIdx.y;
  for (int64_t unit = blockIdx.x; unit < a.units; unit += gridDim.x) {
    const auto [ng, n, grp, p, active] = scale_unit(a, unit, groups, tp);
    A nv = A(1);
    if constexpr (kMode != bcos_math::kModeOne) {
      if constexpr (kNormFromSq) {
        __shared__ A norm_tile[32];
        if (ty == 0 && active) {
          const A* plane = static_cast<const A*>(a.sq) + ng * a.geom.H * a.geom.W;
          const A value = bcos_math::patch_norm_value(box_sum(plane, a.geom, p / a.geom.Wo, p % a.geom.Wo));
          const T stored = IO<T>::store(value);
          static_cast<T*>(a.norm_out)[ng * a.P + p] = stored;
          // the scale uses the stored norm, as the unfused ops do
          norm_tile[tp] = IO<T>::load(stored);
        }
        __syncthreads();
        if (active) nv = norm_tile[tp];
        __syncthreads();  // norm_tile is rewritten by the next unit
      } else {
        if (active) nv = IO<T>::load(static_cast<const T*>(a.norm)[ng * a.P + p]);
      }
    }
    if (!active) continue;
    for (int64_t o = grp * per_group + ty; o < (grp + 1) * per_group; o += blockDim.y) {
      const int64_t no = n * a.O + o;
      const T* l0 = lin + no * a.M * a.P + p;
      A best = IO<T>::load(l0[0]);
      int win = 0;
      for (int64_t m = 1; m < a.M; ++m) {
        const A v = IO<T>::load(l0[m * a.P]);
        if (v > best) {  // strict: the first maximum wins (and a NaN first unit stays)
          best = v;
          win = static_cast<int>(m);
        }
      }
      if (a.M > 1) {
        lin_max[no * a.P + p] = IO<T>::store(best);
        a.winner[no * a.P + p] = static_cast<uint8_t>(win);
      }
      A value = scale_value<kMode>(best, nv, bm1, sc);
      if constexpr (kChannelScale) {
        value = bcos_math::apply_channel_scale(value, IO<T>::load(static_cast<const T*>(a.channel_scale)[o]));
      }
      out[no * a.P + p] = IO<T>::store(value);
    }
  }
}

struct ScaleBackwardTensors {
  const void* grad_out;
  const void* lin_max;
  const void* norm;
  const uint8_t* winner;
  void* grad_lin;
  void* grad_norm;
  double* db_partials;
};

struct ScaleBackwardArgs : ScaleBackwardTensors, ScaleDims {};

// Each thread accumulates d out / d norm over its channels of the group; the
// TY partial sums of a position are added in ty order.  d out / d b: each
// thread sums in double over all its elements, the block adds its threads in
// a fixed tree into db_partials[blockIdx.x]; a second kernel adds those.
template <typename T, int kMode, bool kDetach, bool kNeedDn, bool kNeedDb>
__global__ void __launch_bounds__(kThreads) scale_backward_kernel(ScaleBackwardArgs a) {
  using A = acc_t<T>;
  const T* __restrict__ grad_out = static_cast<const T*>(a.grad_out);
  const T* __restrict__ lin_max = static_cast<const T*>(a.lin_max);
  T* __restrict__ grad_lin = static_cast<T*>(a.grad_lin);
  constexpr bool kReadNorm = kMode != bcos_math::kModeOne;
  const int64_t groups = kReadNorm ? a.G : 1;
  const int64_t per_group = a.O / groups;
  const A bm1 = static_cast<A>(a.b - 1.0);
  const A inv_scale = static_cast<A>(1.0 / a.scale);
  const int tp = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * blockDim.x + tp;
  __shared__ A dn_tile[kThreads];
  __shared__ double db_buf[kThreads];
  double db_thread = 0.0;
  for (int64_t unit = blockIdx.x; unit < a.units; unit += gridDim.x) {
    const auto [ng, n, grp, p, active] = scale_unit(a, unit, groups, tp);
    A inv_n = A(1);
    if constexpr (kReadNorm) {
      if (active) inv_n = A(1) / IO<T>::load(static_cast<const T*>(a.norm)[ng * a.P + p]);
    }
    A dn = A(0);
    if (active) {
      for (int64_t o = grp * per_group + ty; o < (grp + 1) * per_group; o += blockDim.y) {
        const int64_t no = n * a.O + o;
        const A gv = IO<T>::load(grad_out[no * a.P + p]);
        bcos_math::ScaleGrads<A> d;
        if constexpr (kMode == bcos_math::kModeOne) {
          d = bcos_math::scale_grads_one(inv_scale);
        } else if constexpr (kMode == bcos_math::kModeTwo) {
          d = bcos_math::scale_grads_two(IO<T>::load(lin_max[no * a.P + p]), inv_n, inv_scale, kDetach);
        } else {
          d = bcos_math::scale_grads_general(IO<T>::load(lin_max[no * a.P + p]), inv_n, bm1, inv_scale, kDetach);
        }
        const A dl = gv * d.dl;
        if (a.M == 1) {
          grad_lin[no * a.P + p] = IO<T>::store(dl);
        } else {
          // every element of grad_lin is written: dl at the winner, 0 elsewhere
          const int64_t win = a.winner[no * a.P + p];
          for (int64_t m = 0; m < a.M; ++m) {
            grad_lin[(no * a.M + m) * a.P + p] = IO<T>::store(m == win ? dl : A(0));
          }
        }
        if constexpr (kNeedDn) dn += gv * d.dn;
        if constexpr (kNeedDb) db_thread += static_cast<double>(gv * d.db);
      }
    }
    if constexpr (kNeedDn) {
      dn_tile[tid] = dn;
      __syncthreads();
      if (ty == 0 && active) {
        A sum = dn_tile[tp];
        for (unsigned int k = 1; k < blockDim.y; ++k) sum += dn_tile[k * blockDim.x + tp];
        static_cast<T*>(a.grad_norm)[ng * a.P + p] = IO<T>::store(sum);
      }
      __syncthreads();  // dn_tile is rewritten by the next unit
    }
  }
  if constexpr (kNeedDb) {
    db_buf[tid] = db_thread;
    block_tree_sum(db_buf, tid);
    if (tid == 0) a.db_partials[blockIdx.x] = db_buf[0];
  }
}

// grad_b = sum of the partials: each thread adds a strided subset in order,
// then a fixed tree.  One block.
template <typename B>
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const double* __restrict__ partials, int64_t count,
                                                                B* __restrict__ result) {
  __shared__ double buf[kThreads];
  const int tid = threadIdx.x;
  double acc = 0.0;
  for (int64_t i = tid; i < count; i += kThreads) acc += partials[i];
  buf[tid] = acc;
  block_tree_sum(buf, tid);
  if (tid == 0) *result = static_cast<B>(buf[0]);
}

template <typename T, int kMode, bool kNormFromSq>
cudaError_t launch_scale_forward(const ScaleForwardArgs& args, const ScaleProblem& s, cudaStream_t stream) {
  const ScaleGrid l = scale_grid(s);
  if (args.channel_scale != nullptr) {
    return launch_kernel(scale_forward_kernel<T, kMode, kNormFromSq, true>, l.grid, block_of(l), 0, stream, args);
  }
  return launch_kernel(scale_forward_kernel<T, kMode, kNormFromSq, false>, l.grid, block_of(l), 0, stream, args);
}

template <typename T, bool kNormFromSq>
cudaError_t scale_forward_by_mode(const ScaleForwardArgs& args, const ScaleProblem& s, cudaStream_t stream) {
  if (s.mode == bcos_math::kModeOne) {
    if constexpr (kNormFromSq) return cudaErrorInvalidValue;  // no norm in mode one
    return launch_scale_forward<T, bcos_math::kModeOne, false>(args, s, stream);
  }
  if (s.mode == bcos_math::kModeTwo) return launch_scale_forward<T, bcos_math::kModeTwo, kNormFromSq>(args, s, stream);
  return launch_scale_forward<T, bcos_math::kModeGeneral, kNormFromSq>(args, s, stream);
}

// sq (N, G, H, W) acc = the channel sums of squares of x (zeros when the
// groups have no channels).
template <typename T>
cudaError_t launch_sum_squares(const void* x, Strides4 xs, bool channels_last, const PatchGeometry& g, void* sq,
                               cudaStream_t stream) {
  const int64_t total = g.N * g.G * g.H * g.W;
  if (g.Cg == 0) return cudaMemsetAsync(sq, 0, total * sizeof(acc_t<T>), stream);
  return launch_kernel(sum_squares_kernel<T>, grid_for(total, kThreads), kThreads, 0, stream,
                       static_cast<const T*>(x), xs, g, channels_last, static_cast<acc_t<T>*>(sq));
}

}  // namespace

// ===========================================================================
// Launchers.
// ===========================================================================
cudaError_t patch_norm(DType dtype, const void* x, Strides4 x_strides, bool x_channels_last, const PatchGeometry& g,
                       void* sq_workspace, void* norm, cudaStream_t stream) {
  if (g.N * g.G * g.Ho * g.Wo == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const cudaError_t err = launch_sum_squares<T>(x, x_strides, x_channels_last, g, sq_workspace, stream);
    if (err != cudaSuccess) return err;
    const int64_t total = g.N * g.G * g.Ho * g.Wo;
    return launch_kernel(box_norm_kernel<T>, grid_for(total, kThreads), kThreads, 0, stream,
                         static_cast<const acc_t<T>*>(sq_workspace), g, static_cast<T*>(norm));
  });
}

cudaError_t patch_norm_backward(DType dtype, const void* grad_norm, const void* norm, const void* x,
                                Strides4 x_strides, void* grad_x, Strides4 grad_x_strides, bool channels_last,
                                const PatchGeometry& g, void* r_workspace, cudaStream_t stream) {
  if (g.N * g.C * g.H * g.W == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t planes = g.N * g.G * g.H * g.W;
    cudaError_t err = launch_kernel(scatter_norm_grad_kernel<T>, grid_for(planes, kThreads), kThreads, 0, stream,
                                    static_cast<const T*>(grad_norm), static_cast<const T*>(norm), g,
                                    static_cast<acc_t<T>*>(r_workspace));
    if (err != cudaSuccess) return err;
    const int64_t total = g.N * g.C * g.H * g.W;
    return launch_kernel(mul_by_group_kernel<T>, grid_for(total, kThreads), kThreads, 0, stream,
                         static_cast<const T*>(x), x_strides, static_cast<const acc_t<T>*>(r_workspace), g,
                         channels_last, static_cast<T*>(grad_x), grad_x_strides);
  });
}

cudaError_t bcos_scale_forward(DType dtype, const void* lin, const void* norm, void* out, void* lin_max,
                               uint8_t* winner, const void* channel_scale, const ScaleProblem& s,
                               cudaStream_t stream) {
  if (!valid_problem(s)) return cudaErrorInvalidValue;
  if (s.N * s.O * s.P == 0) return cudaSuccess;
  const ScaleForwardArgs args{{lin, norm, nullptr, nullptr, out, lin_max, winner, channel_scale}, scale_dims(s), {}};
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return scale_forward_by_mode<T, false>(args, s, stream);
  });
}

cudaError_t bcos_conv_scale_forward(DType dtype, const void* lin, const void* x, Strides4 x_strides,
                                    bool x_channels_last, const PatchGeometry& g, void* sq_workspace, void* norm,
                                    void* out, void* lin_max, uint8_t* winner, const void* channel_scale,
                                    const ScaleProblem& s, cudaStream_t stream) {
  if (!valid_problem(s) || s.mode == bcos_math::kModeOne) return cudaErrorInvalidValue;
  if (s.P != g.Ho * g.Wo || s.G != g.G || s.N != g.N) return cudaErrorInvalidValue;
  const ScaleForwardArgs args{{lin, nullptr, sq_workspace, norm, out, lin_max, winner, channel_scale}, scale_dims(s), g};
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (s.N * s.G * s.P == 0) return cudaSuccess;
    const cudaError_t err = launch_sum_squares<T>(x, x_strides, x_channels_last, g, sq_workspace, stream);
    if (err != cudaSuccess) return err;
    // O == 0: the pass still runs, to write the norms
    return scale_forward_by_mode<T, true>(args, s, stream);
  });
}

int64_t bcos_scale_backward_partials(const ScaleProblem& s) { return detail::scale_grid(s).grid; }

cudaError_t bcos_scale_backward(DType dtype, const void* grad_out, const void* lin_max, const void* norm,
                                const uint8_t* winner, void* grad_lin, void* grad_norm, void* grad_b,
                                double* db_partials, const ScaleProblem& s, bool detach, cudaStream_t stream) {
  if (!valid_problem(s)) return cudaErrorInvalidValue;
  const bool need_dn = grad_norm != nullptr;
  const bool need_db = grad_b != nullptr;
  if (need_dn && (detach || s.mode == bcos_math::kModeOne)) return cudaErrorInvalidValue;
  if (need_db && s.mode != bcos_math::kModeGeneral) return cudaErrorInvalidValue;
  const detail::ScaleGrid l = detail::scale_grid(s);
  const ScaleBackwardArgs args{{grad_out, lin_max, norm, winner, grad_lin, grad_norm, db_partials}, scale_dims(s)};
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    if (s.N * s.O * s.P == 0) {
      // nothing to scatter; the reductions are empty sums
      if (need_dn) {
        cudaError_t err = cudaMemsetAsync(grad_norm, 0, s.N * s.G * s.P * sizeof(T), stream);
        if (err != cudaSuccess) return err;
      }
      if (need_db) return cudaMemsetAsync(grad_b, 0, sizeof(acc_t<T>), stream);
      return cudaSuccess;
    }
    const cudaError_t err = bcos_math::dispatch_scale_backward(
        s.mode, detach, need_dn, need_db, [&](auto mode_c, auto detach_c, auto dn_c, auto db_c) {
          return launch_kernel(scale_backward_kernel<T, decltype(mode_c)::value, decltype(detach_c)::value,
                                                     decltype(dn_c)::value, decltype(db_c)::value>,
                               l.grid, block_of(l), 0, stream, args);
        });
    if (err != cudaSuccess || !need_db) return err;
    return launch_kernel(sum_partials_kernel<acc_t<T>>, 1, kThreads, 0, stream, db_partials,
                         static_cast<int64_t>(l.grid), static_cast<acc_t<T>*>(grad_b));
  });
}

}  // namespace cuda
}  // namespace bcos_kernels
