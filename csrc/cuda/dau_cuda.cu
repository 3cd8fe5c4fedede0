// CUDA kernels of the DAU (CoDA) epilogue: everything of the restructured
// DAU convolution that is not a convolution (math: csrc/common/dau_math.h).
// The convolutions z = conv(x, A) and y = conv(x, [E | b]) run in cuDNN; these
// kernels combine them per pixel without building per-pixel weights.
//
//   forward   : one block per tile of kPix pixels; za of the tile in shared
//               memory; a thread per DAU o computes num_o and q_o for the
//               whole tile (each entry of G_o is loaded once per tile).
//   backward  : (1) per (pixel, DAU): dnum, dq (workspace) and dy = dnum za
//               (2) per (pixel, entry t): d za_t = sum over DAUs, in DAU order
//               (3) per (pixel chunk, DAU): partial M_o over the chunk's pixels
//               (4) M_o = the chunks' partials added in chunk order
//               No atomics: every sum has a fixed order.
#include "common/dau_math.h"
#include "cuda/cuda_common.cuh"

namespace bcos_kernels {
namespace cuda {
namespace {

using namespace detail;

constexpr int kPix = kDauPix;
constexpr int kUnitThreads = kDauUnitThreads;

// The inputs of the kernels (grad_out and s: backward only).
struct DauInputs {
  Matrix grad_out, y, z, s;
  const void* gram;
};

// Inputs, problem (P, O, r, R, norm), outputs and workspaces of every kernel.
struct DauArgs : DauInputs, DauProblem {
  void* out;     // forward: (P, O) dtype
  void* s_out;   // forward: (P, O) acc
  void* dz;      // backward (2)
  void* dy;      // backward (1)
  void* m;       // backward (4)
  void* dnum;    // workspace (P, O) acc
  void* dq;      // workspace (P, O) acc
  void* m_part;  // workspace (chunks, O, R, R) acc
  int64_t chunks, chunk_len;
  bool detach;
};

template <typename T>
__device__ __forceinline__ acc_t<T> load_at(const Matrix& mat, int64_t row, int64_t col) {
  return IO<T>::load(static_cast<const T*>(mat.data)[row * mat.row_stride + col * mat.col_stride]);
}

// za of pixel p, entry q: z[p, q] for q < r, the constant 1 of the bias for
// q == r; 0 for pixels past the end (their results are never written).
template <typename T>
__device__ __forceinline__ acc_t<T> za_at(const DauArgs& a, int64_t p, int q) {
  using A = acc_t<T>;
  if (p >= a.P) return A(0);
  return q < a.r ? load_at<T>(a.z, p, q) : A(1);
}

// Loads za of the tile's pixels into shared memory (rows of R).
template <typename T>
__device__ __forceinline__ void load_za_tile(const DauArgs& a, int64_t p0, int pixels, acc_t<T>* za) {
  __syncthreads();  // the previous tile's readers are done
  for (int k = threadIdx.x; k < pixels * a.R; k += blockDim.x) za[k] = za_at<T>(a, p0 + k / a.R, k % a.R);
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kUnitThreads) dau_forward_kernel(DauArgs a) {
  using A = acc_t<T>;
  A* za = dynamic_shared<A>();
  const A* gram = static_cast<const A*>(a.gram);
  const int64_t RR = static_cast<int64_t>(a.R) * a.R;
  const int64_t tiles = div_up(a.P, kPix);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t p0 = tile * kPix;
    load_za_tile<T>(a, p0, kPix, za);
    for (int64_t o = threadIdx.x; o < a.O; o += blockDim.x) {
      auto y = [&](int i, int q) -> A {
        const int64_t p = p0 + i;
        return p < a.P ? load_at<T>(a.y, p, o * a.R + q) : A(0);
      };
      A num[kPix], quad[kPix];
      bcos_math::dau_unit_forward<kPix>(za, a.R, gram + o * RR, y, num, quad);
      for (int i = 0; i < kPix; ++i) {
        const int64_t p = p0 + i;
        if (p >= a.P) break;
        const A s = bcos_math::dau_norm_from_quad(quad[i]);
        const bcos_math::DauScale<A> sc = bcos_math::dau_scale(s, a.norm);
        static_cast<T*>(a.out)[p * a.O + o] = IO<T>::store(num[i] * sc.inv);
        static_cast<A*>(a.s_out)[p * a.O + o] = s;
      }
    }
  }
}

// Backward (1): dnum, dq per (pixel, DAU) and dy = dnum za.
template <typename T>
__global__ void __launch_bounds__(kUnitThreads) dau_backward_unit_kernel(DauArgs a) {
  using A = acc_t<T>;
  A* za = dynamic_shared<A>();
  const int64_t tiles = div_up(a.P, kPix);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t p0 = tile * kPix;
    load_za_tile<T>(a, p0, kPix, za);
    for (int64_t o = threadIdx.x; o < a.O; o += blockDim.x) {
      for (int i = 0; i < kPix; ++i) {
        const int64_t p = p0 + i;
        if (p >= a.P) break;
        const A* zrow = za + i * a.R;
        A num = A(0);
        for (int q = 0; q < a.R; ++q) num += zrow[q] * load_at<T>(a.y, p, o * a.R + q);
        const bcos_math::DauScale<A> sc = bcos_math::dau_scale(load_at<A>(a.s, p, o), a.norm);
        const A g = load_at<T>(a.grad_out, p, o);
        const A dnum = g * sc.inv;
        // out as the forward stored it
        const A out = round_to<T>(num * sc.inv);
        static_cast<A*>(a.dnum)[p * a.O + o] = dnum;
        static_cast<A*>(a.dq)[p * a.O + o] = a.detach ? A(0) : (g * out) * sc.ratio;
        if (a.dy != nullptr) {
          T* dy = static_cast<T*>(a.dy) + p * a.O * a.R + o * a.R;
          for (int q = 0; q < a.R; ++q) dy[q] = IO<T>::store(dnum * zrow[q]);
        }
      }
    }
  }
}

// Backward (2): dz[p, t] for t < r; threads over (pixel of the tile, t).
template <typename T>
__global__ void __launch_bounds__(kThreads) dau_backward_za_kernel(DauArgs a, int pixels_per_tile) {
  using A = acc_t<T>;
  A* za = dynamic_shared<A>();
  const A* gram = static_cast<const A*>(a.gram);
  const A* dnum = static_cast<const A*>(a.dnum);
  const A* dq = static_cast<const A*>(a.dq);
  const int64_t tiles = div_up(a.P, pixels_per_tile);
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t p0 = tile * pixels_per_tile;
    load_za_tile<T>(a, p0, pixels_per_tile, za);
    for (int k = threadIdx.x; k < pixels_per_tile * a.r; k += blockDim.x) {
      const int i = k / a.r;
      const int t = k % a.r;
      const int64_t p = p0 + i;
      if (p >= a.P) continue;
      auto dnum_at = [&](int64_t o) { return dnum[p * a.O + o]; };
      auto dq_at = [&](int64_t o) { return dq[p * a.O + o]; };
      auto y_at = [&](int64_t o, int q) { return load_at<T>(a.y, p, o * a.R + q); };
      const A g = bcos_math::dau_grad_za(t, a.O, a.R, za + i * a.R, gram, dnum_at, dq_at, y_at, true);
      static_cast<T*>(a.dz)[p * a.r + t] = IO<T>::store(g);
    }
  }
}

// Backward (3): part[chunk, o, s, t] = sum over the chunk's pixels of (dq za_s) za_t.
template <typename T>
__global__ void __launch_bounds__(kThreads) dau_backward_m_partial_kernel(DauArgs a) {
  using A = acc_t<T>;
  const A* dq = static_cast<const A*>(a.dq);
  const int64_t RR = static_cast<int64_t>(a.R) * a.R;
  const int64_t units = a.chunks * a.O;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int64_t chunk = unit / a.O;
    const int64_t o = unit % a.O;
    const int64_t p_begin = chunk * a.chunk_len;
    const int64_t p_end = p_begin + a.chunk_len < a.P ? p_begin + a.chunk_len : a.P;
    for (int64_t st = threadIdx.x; st < RR; st += blockDim.x) {
      const int s = static_cast<int>(st / a.R);
      const int t = static_cast<int>(st % a.R);
      A acc = A(0);
      for (int64_t p = p_begin; p < p_end; ++p) acc += (dq[p * a.O + o] * za_at<T>(a, p, s)) * za_at<T>(a, p, t);
      static_cast<A*>(a.m_part)[unit * RR + st] = acc;
    }
  }
}

// Backward (4): m = sum of the partials in chunk order.
template <typename A>
__global__ void __launch_bounds__(kThreads) dau_backward_m_sum_kernel(const A* __restrict__ part, int64_t chunks,
                                                                     int64_t per_chunk, A* __restrict__ m) {
  for (int64_t idx = grid_stride_begin(); idx < per_chunk; idx += grid_stride_step()) {
    A acc = A(0);
    for (int64_t c = 0; c < chunks; ++c) acc += part[c * per_chunk + idx];
    m[idx] = acc;
  }
}

DauArgs make_args(const DauInputs& in, const DauProblem& d) {
  DauArgs a{};
  static_cast<DauInputs&>(a) = in;
  static_cast<DauProblem&>(a) = d;
  return a;
}

}  // namespace

cudaError_t dau_forward(DType dtype, Matrix y, Matrix z, const void* gram, const DauProblem& d, void* out, void* s,
                        cudaStream_t stream) {
  if (!valid_problem(d)) return cudaErrorInvalidValue;
  if (d.P * d.O == 0) return cudaSuccess;
  DauArgs a = make_args(DauInputs{Matrix{}, y, z, Matrix{}, gram}, d);
  a.out = out;
  a.s_out = s;
  const size_t smem = kPix * d.R * detail::acc_size(dtype);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_kernel(dau_forward_kernel<T>, grid_for(d.P, kPix), kUnitThreads, smem, stream, a);
  });
}

int64_t dau_backward_workspace_elems(const DauProblem& d, bool need_m) { return detail::dau_workspace_elems(d, need_m); }

cudaError_t dau_backward(DType dtype, Matrix grad_out, Matrix y, Matrix z, Matrix s, const void* gram,
                         const DauProblem& d, bool detach, void* dz, void* dy, void* m, void* workspace,
                         cudaStream_t stream) {
  if (!valid_problem(d)) return cudaErrorInvalidValue;
  if (detach && (dz != nullptr || m != nullptr)) return cudaErrorInvalidValue;
  DauArgs a = make_args(DauInputs{grad_out, y, z, s, gram}, d);
  a.detach = detach;
  a.dz = dz;
  a.dy = dy;
  a.m = m;
  const detail::DauChunks chunks = detail::dau_chunking(d);
  a.chunks = chunks.chunks;
  a.chunk_len = chunks.chunk_len;
  const size_t acc_bytes = detail::acc_size(dtype);
  a.dnum = workspace;
  a.dq = static_cast<unsigned char*>(workspace) + d.P * d.O * acc_bytes;
  a.m_part = static_cast<unsigned char*>(workspace) + 2 * d.P * d.O * acc_bytes;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int64_t RR = static_cast<int64_t>(d.R) * d.R;
    if (d.P * d.O == 0) {
      // empty sums: dz and m are zero (dy is empty)
      if (dz != nullptr && d.P * d.r > 0) {
        cudaError_t err = cudaMemsetAsync(dz, 0, d.P * d.r * sizeof(T), stream);
        if (err != cudaSuccess) return err;
      }
      if (m != nullptr && d.O * RR > 0) return cudaMemsetAsync(m, 0, d.O * RR * sizeof(A), stream);
      return cudaSuccess;
    }
    cudaError_t err =
        launch_kernel(dau_backward_unit_kernel<T>, grid_for(d.P, kPix), kUnitThreads, kPix * d.R * sizeof(A), stream, a);
    if (err != cudaSuccess) return err;
    if (dz != nullptr) {
      const int ppt = dau_za_pixels_per_tile(d.R);
      err = launch_kernel(dau_backward_za_kernel<T>, grid_for(d.P, ppt), kThreads, ppt * d.R * sizeof(A), stream, a,
                          ppt);
      if (err != cudaSuccess) return err;
    }
    if (m != nullptr) {
      err = launch_kernel(dau_backward_m_partial_kernel<T>, grid_for(a.chunks * d.O, 1), kThreads, 0, stream, a);
      if (err != cudaSuccess) return err;
      const int64_t per_chunk = d.O * RR;
      err = launch_kernel(dau_backward_m_sum_kernel<A>, grid_for(per_chunk, kThreads), kThreads, 0, stream,
                          static_cast<const A*>(a.m_part), a.chunks, per_chunk, static_cast<A*>(m));
    }
    return err;
  });
}

}  // namespace cuda
}  // namespace bcos_kernels
