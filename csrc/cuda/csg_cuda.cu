// CUDA kernels of CSG's class-specific gate (semantics:
// bcos_kernels/reference/csg.py, bcos_kernels/ops/class_specific_gate.py).
//
//   forward      : out[n, c, hw] = x[n, c, hw] * mask[c, labels[n]]   (elementwise gather-multiply)
//   backward (1) : per (n, c): grad_x = grad_out * mask[c, labels[n]] and
//                  s[n, c] = sum over hw of grad_out * x (acc, fixed order)
//   backward (2) : grad_mask[c, k] = sum over n with labels[n] == k of s[n, c],
//                  n ascending -- a segmented sum without atomics
#include <type_traits>

#include "cuda/cuda_common.cuh"

namespace bcos_kernels {
namespace cuda {
namespace {

using namespace detail;

// mask[c, labels[n]], or NaN for a label outside [0, K) (no out-of-bounds read).
template <typename T>
__device__ __forceinline__ acc_t<T> gate_value(const T* mask, const int64_t* labels, int64_t n, int64_t c,
                                               int64_t K) {
  const int64_t k = labels[n];
  if (k < 0 || k >= K) return static_cast<acc_t<T>>(NAN);
  return IO<T>::load(mask[c * K + k]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) csg_forward_kernel(const T* __restrict__ x, const T* __restrict__ mask,
                                                               const int64_t* __restrict__ labels, CsgProblem p,
                                                               T* __restrict__ out) {
  const int64_t total = p.N * p.C * p.HW;
  for (int64_t idx = grid_stride_begin(); idx < total; idx += grid_stride_step()) {
    const int64_t n = idx / (p.C * p.HW);
    const int64_t c = p.channels_last ? idx % p.C : (idx / p.HW) % p.C;
    out[idx] = IO<T>::store(IO<T>::load(x[idx]) * gate_value(mask, labels, n, c, p.K));
  }
}

// Backward (1), per (n, c) row: grad_x = grad_out * gate and
// per_sample[n, c] = sum over hw of grad_out * x (either may be null).
//   kByColumns, (N, HW, C): a thread per row walks hw in order (neighbouring
//     threads read neighbouring channels);
//   otherwise, (N, C, HW): a warp per row of HW contiguous elements; each
//     lane sums a strided subset in order, then a fixed shuffle tree.
template <typename T, bool kByColumns>
__global__ void __launch_bounds__(kThreads) csg_backward_kernel(const T* __restrict__ grad_out,
                                                                const T* __restrict__ x, const T* __restrict__ mask,
                                                                const int64_t* __restrict__ labels, CsgProblem p,
                                                                T* __restrict__ grad_x,
                                                                acc_t<T>* __restrict__ per_sample) {
  using A = acc_t<T>;
  const int64_t rows = p.N * p.C;
  if constexpr (kByColumns) {
    for (int64_t row = grid_stride_begin(); row < rows; row += grid_stride_step()) {
      const int64_t n = row / p.C;
      const int64_t c = row % p.C;
      const int64_t first = n * p.HW * p.C + c;
      if (grad_x != nullptr) {
        const A gate = gate_value(mask, labels, n, c, p.K);
        for (int64_t i = 0; i < p.HW; ++i) {
          const int64_t e = first + i * p.C;
          grad_x[e] = IO<T>::store(IO<T>::load(grad_out[e]) * gate);
        }
      }
      if (per_sample != nullptr) {
        A acc = A(0);
        for (int64_t i = 0; i < p.HW; ++i) {
          const int64_t e = first + i * p.C;
          acc += IO<T>::load(grad_out[e]) * IO<T>::load(x[e]);
        }
        per_sample[row] = acc;
      }
    }
  } else {
    const int lane = threadIdx.x % kWarp;
    const int64_t warps_per_block = blockDim.x / kWarp;
    // rows is the same for every lane of a warp, so whole warps take the loop
    // together (the shuffles need all 32 lanes).
    for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / kWarp; row < rows;
         row += static_cast<int64_t>(gridDim.x) * warps_per_block) {
      const int64_t n = row / p.C;
      const int64_t c = row % p.C;
      const T* g = grad_out + row * p.HW;
      A acc = A(0);
      if (grad_x != nullptr) {
        const A gate = gate_value(mask, labels, n, c, p.K);
        T* gx = grad_x + row * p.HW;
        for (int64_t i = lane; i < p.HW; i += kWarp) gx[i] = IO<T>::store(IO<T>::load(g[i]) * gate);
      }
      if (per_sample != nullptr) {
        const T* xr = x + row * p.HW;
        for (int64_t i = lane; i < p.HW; i += kWarp) acc += IO<T>::load(g[i]) * IO<T>::load(xr[i]);
        for (int width = kWarp / 2; width > 0; width >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, width);
        if (lane == 0) per_sample[row] = acc;
      }
    }
  }
}

// Backward (2): a thread per (c, k), samples in ascending order.
template <typename T>
__global__ void __launch_bounds__(kThreads) csg_mask_grad_kernel(const acc_t<T>* __restrict__ per_sample,
                                                                 const int64_t* __restrict__ labels, CsgProblem p,
                                                                 T* __restrict__ grad_mask) {
  using A = acc_t<T>;
  const int64_t total = p.C * p.K;
  for (int64_t idx = grid_stride_begin(); idx < total; idx += grid_stride_step()) {
    const int64_t c = idx / p.K;
    const int64_t k = idx % p.K;
    A acc = A(0);
    for (int64_t n = 0; n < p.N; ++n) {
      if (labels[n] == k) acc += per_sample[n * p.C + c];
    }
    grad_mask[idx] = IO<T>::store(acc);
  }
}

}  // namespace

cudaError_t csg_forward(DType dtype, const void* x, const void* mask, const int64_t* labels, const CsgProblem& p,
                        void* out, cudaStream_t stream) {
  if (!valid_problem(p)) return cudaErrorInvalidValue;
  const int64_t total = p.N * p.C * p.HW;
  if (total == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return launch_kernel(csg_forward_kernel<T>, grid_for(total, kThreads), kThreads, 0, stream,
                         static_cast<const T*>(x), static_cast<const T*>(mask), labels, p, static_cast<T*>(out));
  });
}

cudaError_t csg_backward(DType dtype, const void* grad_out, const void* x, const void* mask, const int64_t* labels,
                         const CsgProblem& p, void* grad_x, void* grad_mask, void* per_sample_workspace,
                         cudaStream_t stream) {
  if (!valid_problem(p)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A* per_sample = grad_mask != nullptr ? static_cast<A*>(per_sample_workspace) : nullptr;
    const int64_t rows = p.N * p.C;
    if (rows > 0 && (grad_x != nullptr || per_sample != nullptr)) {
      cudaError_t err = cudaSuccess;
      if (p.HW == 0) {
        // empty feature maps: nothing to gate, the per-sample sums are 0
        if (per_sample != nullptr) err = cudaMemsetAsync(per_sample, 0, rows * sizeof(A), stream);
      } else {
        // by columns for (N, HW, C), and for (N, C) inputs (HW == 1), where both layouts agree;
        // else (N, C, HW), a warp per row
        err = launch_kernel(csg_backward_by_columns(p) ? csg_backward_kernel<T, true> : csg_backward_kernel<T, false>,
                            csg_backward_grid(p), kThreads, 0, stream, static_cast<const T*>(grad_out),
                            static_cast<const T*>(x), static_cast<const T*>(mask), labels, p,
                            static_cast<T*>(grad_x), per_sample);
      }
      if (err != cudaSuccess) return err;
    }
    if (grad_mask != nullptr && p.C * p.K > 0) {
      return launch_kernel(csg_mask_grad_kernel<T>, grid_for(p.C * p.K, kThreads), kThreads, 0, stream,
                           static_cast<const A*>(per_sample), labels, p, static_cast<T*>(grad_mask));
    }
    return cudaSuccess;
  });
}

}  // namespace cuda
}  // namespace bcos_kernels
