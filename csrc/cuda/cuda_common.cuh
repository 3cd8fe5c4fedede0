// Helpers shared by the CUDA kernel files (plain CUDA, no torch).
#ifndef BCOS_KERNELS_CUDA_CUDA_COMMON_CUH_
#define BCOS_KERNELS_CUDA_CUDA_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"
#include "cuda/launch_geometry.h"

namespace bcos_kernels {
namespace cuda {
namespace detail {

// Storage type <-> accumulation type.  Conversions go through the explicit
// intrinsics: torch builds CUDA code with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, which remove the implicit ones.
template <typename T>
struct IO;

template <>
struct IO<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};

template <>
struct IO<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};

template <>
struct IO<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};

template <>
struct IO<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
using acc_t = typename IO<T>::acc;

// The value an acc-type result has once stored in T and read back.
template <typename T>
__device__ __forceinline__ acc_t<T> round_to(acc_t<T> v) {
  return IO<T>::load(IO<T>::store(v));
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) with the storage type of `dtype`.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(TypeTag<float>{});
    case DType::kFloat64:
      return fn(TypeTag<double>{});
    case DType::kBFloat16:
      return fn(TypeTag<__nv_bfloat16>{});
    case DType::kFloat16:
      return fn(TypeTag<__half>{});
  }
  return cudaErrorInvalidValue;
}

// Grid-stride loops over n work items:
//   for (int64_t i = grid_stride_begin(); i < n; i += grid_stride_step()) ...
__device__ __forceinline__ int64_t grid_stride_begin() {
  return blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride_step() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...) and returns
// the launch status (cudaGetLastError()).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          Args... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "launch_kernel: wrong number of kernel arguments");
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<Params>(args)...);
  return cudaGetLastError();
}

// The block's dynamic shared memory (the smem_bytes of the launch) as A[].
template <typename A>
__device__ __forceinline__ A* dynamic_shared() {
  extern __shared__ __align__(16) unsigned char dynamic_smem[];
  return reinterpret_cast<A*>(dynamic_smem);
}

// Fixed-shape tree sum of kThreads values in shared memory; the result is in
// buf[0] for all threads after the call.  Every thread of the block must call it.
template <typename V>
__device__ __forceinline__ void block_tree_sum(V* buf, int tid) {
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width >>= 1) {
    if (tid < width) buf[tid] += buf[tid + width];
    __syncthreads();
  }
}

}  // namespace detail
}  // namespace cuda
}  // namespace bcos_kernels

#endif  // BCOS_KERNELS_CUDA_CUDA_COMMON_CUH_
