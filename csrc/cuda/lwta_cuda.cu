// CUDA kernels of DISCOVER's LWTA (math: csrc/common/lwta_math.h; random
// numbers: csrc/common/philox.h).  One thread per competition block: it reads
// the block's U units (stride `inner` apart, so neighbouring threads read
// neighbouring memory in NCHW), draws or reads their uniforms, and writes the
// whole block.  The backward re-draws the same uniforms from (seed, offset)
// instead of storing them.
#include <type_traits>

#include "common/lwta_math.h"
#include "common/philox.h"
#include "cuda/cuda_common.cuh"

namespace bcos_kernels {
namespace cuda {
namespace {

using namespace detail;
using bcos_math::PhiloxNoise;

// Uniforms given as a tensor of dtype NT: the Gumbel transform runs in NT,
// rounded to NT after every operation (torch's semantics for half tensors).
template <typename NT>
struct TensorNoise {
  const NT* u;
  template <typename A>
  __device__ __forceinline__ A gumbel(int64_t index) const {
    using NA = acc_t<NT>;
    auto round = [](NA v) { return round_to<NT>(v); };
    return static_cast<A>(bcos_math::gumbel_from_uniform(IO<NT>::load(u[index]), round));
  }
};

// The tensors of the kernels (forward: x, out, winner_out; backward: x,
// grad_out, out = grad_x, winner_in).
struct LwtaTensors {
  const void* x;
  const void* grad_out;
  void* out;  // forward: out; backward: grad_x
  const uint8_t* winner_in;
  uint8_t* winner_out;
};

// The tensors and what the kernels read of the LwtaProblem (seed and offset
// travel in PhiloxNoise).
struct LwtaArgs : LwtaTensors {
  int64_t outer, C, inner;
  int U;
  double temperature;
  bool deterministic;
};

__device__ __forceinline__ int64_t block_base(const LwtaArgs& a, int64_t idx, int U) {
  return lwta_block_base(a.C, a.inner, idx, U);
}

// Calls fn(logit) with logit(k) = (g_k + x_k) / T: from registers when U is
// a compile-time constant (kU > 0), recomputed on each call otherwise.
template <int kU, typename A, typename Live, typename Fn>
__device__ __forceinline__ void with_logits(int U, const Live& live, const Fn& fn) {
  if constexpr (kU > 0) {
    A cached[kU];
#pragma unroll
    for (int k = 0; k < kU; ++k) cached[k] = live(k);
    fn([&](int k) { return cached[k]; });
  } else {
    (void)U;
    fn(live);
  }
}

// Calls body(idx, base, U, temperature) for each competition block idx of the
// thread (grid-stride), base = the element index of its unit 0; U is kU when
// that is a compile-time constant (kU > 0).
template <int kU, typename A, typename Body>
__device__ __forceinline__ void for_each_block(const LwtaArgs& a, const Body& body) {
  const int U = kU > 0 ? kU : a.U;
  const int64_t total = a.outer * (a.C / U) * a.inner;
  const A temperature = static_cast<A>(a.temperature);
  for (int64_t idx = grid_stride_begin(); idx < total; idx += grid_stride_step()) {
    body(idx, block_base(a, idx, U), U, temperature);
  }
}

template <typename T, typename Noise, int kU>
__global__ void __launch_bounds__(kThreads) lwta_forward_kernel(LwtaArgs a, Noise noise) {
  using A = acc_t<T>;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ out = static_cast<T*>(a.out);
  for_each_block<kU, A>(a, [&](int64_t idx, int64_t base, int U, A temperature) {
    auto x_at = [&](int k) { return IO<T>::load(x[base + k * a.inner]); };
    int win;
    A win_value;
    A p_win = A(0);  // deterministic: the loser mask is x * 0
    if (a.deterministic) {
      win = bcos_math::lwta_hard_choice<A>(U, x_at);
      win_value = x_at(win);  // the mask is exactly 1: x itself
    } else {
      auto live = [&](int k) { return (noise.template gumbel<A>(base + k * a.inner) + x_at(k)) / temperature; };
      bcos_math::LwtaChoice<A> choice{0, A(0)};
      with_logits<kU, A>(U, live, [&](const auto& logit) { choice = bcos_math::lwta_soft_choice<A>(U, logit); });
      win = choice.winner;
      win_value = bcos_math::lwta_winner_value(x_at(win), choice.p_win);
      p_win = choice.p_win;
    }
    for (int k = 0; k < U; ++k) {
      out[base + k * a.inner] = IO<T>::store(k == win ? win_value : bcos_math::lwta_loser_value(x_at(k), p_win));
    }
    a.winner_out[idx] = static_cast<uint8_t>(win);
  });
}

template <typename T, typename Noise, int kU>
__global__ void __launch_bounds__(kThreads) lwta_backward_kernel(LwtaArgs a, Noise noise) {
  using A = acc_t<T>;
  const T* __restrict__ x = static_cast<const T*>(a.x);
  const T* __restrict__ grad_out = static_cast<const T*>(a.grad_out);
  T* __restrict__ grad_x = static_cast<T*>(a.out);
  for_each_block<kU, A>(a, [&](int64_t idx, int64_t base, int U, A temperature) {
    const int win = a.winner_in[idx];
    auto up = [&](int k) { return IO<T>::load(grad_out[base + k * a.inner]); };
    auto store = [&](int k, A v) { grad_x[base + k * a.inner] = IO<T>::store(v); };
    if (a.deterministic) {
      for (int k = 0; k < U; ++k) store(k, k == win ? up(k) : A(0));
      return;
    }
    auto x_at = [&](int k) { return IO<T>::load(x[base + k * a.inner]); };
    auto v = [&](int k) { return up(k) * x_at(k); };
    auto live = [&](int k) { return (noise.template gumbel<A>(base + k * a.inner) + x_at(k)) / temperature; };
    with_logits<kU, A>(U, live, [&](const auto& logit) {
      bcos_math::lwta_soft_backward<A>(U, win, temperature, logit, v, up, store);
    });
  });
}

__global__ void __launch_bounds__(kThreads) lwta_uniform_kernel(float* __restrict__ u, int64_t numel, uint64_t seed,
                                                                uint64_t offset) {
  for (int64_t idx = grid_stride_begin(); idx < numel; idx += grid_stride_step()) {
    u[idx] = bcos_math::lwta_uniform(seed, offset, static_cast<uint64_t>(idx));
  }
}

// Runs launch(noise, kU constant) with the noise source and a compile-time U
// where one fits (U = 2 and 4, the sizes of the published models).
template <typename T, typename Launch>
cudaError_t dispatch_noise_and_units(const void* noise, DType dtype, DType noise_dtype, const LwtaProblem& p,
                                     const Launch& launch) {
  auto by_units = [&](auto noise_source) {
    if (p.U == 2) return launch(noise_source, std::integral_constant<int, 2>{});
    if (p.U == 4) return launch(noise_source, std::integral_constant<int, 4>{});
    return launch(noise_source, std::integral_constant<int, 0>{});
  };
  if (p.deterministic || noise == nullptr) return by_units(PhiloxNoise{p.seed, p.offset});
  if (noise_dtype == DType::kFloat32) return by_units(TensorNoise<float>{static_cast<const float*>(noise)});
  if (noise_dtype == dtype) return by_units(TensorNoise<T>{static_cast<const T*>(noise)});
  return cudaErrorInvalidValue;
}

// Launches pick(TypeTag<T>{}, noise source, kU constant) -- the forward or
// the backward kernel of that dtype, noise source and U -- over the blocks of p.
template <typename PickKernel>
cudaError_t launch_blocks(DType dtype, const LwtaTensors& tensors, const void* noise, DType noise_dtype,
                          const LwtaProblem& p, cudaStream_t stream, const PickKernel& pick) {
  if (!valid_problem(p)) return cudaErrorInvalidValue;
  const int64_t total = lwta_blocks(p);
  if (total == 0) return cudaSuccess;
  const LwtaArgs a{tensors, p.outer, p.C, p.inner, p.U, p.temperature, p.deterministic};
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return dispatch_noise_and_units<T>(noise, dtype, noise_dtype, p, [&](auto noise_source, auto units) {
      return launch_kernel(pick(tag, noise_source, units), grid_for(total, kThreads), kThreads, 0, stream, a,
                           noise_source);
    });
  });
}

}  // namespace

cudaError_t lwta_forward(DType dtype, const void* x, const void* noise, DType noise_dtype, const LwtaProblem& p,
                         void* out, uint8_t* winner, cudaStream_t stream) {
  return launch_blocks(dtype, LwtaTensors{x, nullptr, out, nullptr, winner}, noise, noise_dtype, p, stream,
                       [](auto tag, auto noise_source, auto units) {
                         return lwta_forward_kernel<typename decltype(tag)::type, decltype(noise_source),
                                                    decltype(units)::value>;
                       });
}

cudaError_t lwta_backward(DType dtype, const void* grad_out, const void* x, const uint8_t* winner, const void* noise,
                          DType noise_dtype, const LwtaProblem& p, void* grad_x, cudaStream_t stream) {
  return launch_blocks(dtype, LwtaTensors{x, grad_out, grad_x, winner, nullptr}, noise, noise_dtype, p, stream,
                       [](auto tag, auto noise_source, auto units) {
                         return lwta_backward_kernel<typename decltype(tag)::type, decltype(noise_source),
                                                     decltype(units)::value>;
                       });
}

cudaError_t lwta_uniform(float* u, int64_t numel, uint64_t seed, uint64_t offset, cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  return launch_kernel(lwta_uniform_kernel, grid_for(numel, kThreads), kThreads, 0, stream, u, numel, seed, offset);
}

}  // namespace cuda
}  // namespace bcos_kernels
