// CPU kernels of CSG's class-specific gate: the ops csg_gate_forward and csg_gate_backward (schemas and
// semantics: csrc/cuda_schemas.cpp), the same as the CUDA backend's.  One pass each way over x (NCHW, or NHWC
// memory read in place); the gradient of the mask is a per-sample sum of grad_out * x over the positions
// followed by a sum over the samples of each class in batch order: deterministic, no atomics.  Products in
// the compute type (float for bf16/fp16), sums in float (double for fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <optional>
#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "arg_checks.h"

namespace bcos_kernels {
namespace cpu {
namespace {

using bcos_checks::CpuDevice;
using bcos_checks::CsgShape;

constexpr int64_t kElemGrain = 1 << 15;  // elements per unit of parallel work

// The sums' type: float, double for fp64 (bcos_checks::acc_dtype).
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// gate(n, c) = mask[c, labels[n]], in the compute type.
template <typename T>
struct Gate {
  const T* mask;
  const int64_t* labels;
  int64_t K;
  at::opmath_type<T> operator()(int64_t n, int64_t c) const {
    return static_cast<at::opmath_type<T>>(mask[c * K + labels[n]]);
  }
};

// sum_p a[p] * b[p] in S, over kLanes interleaved partial sums added up at the end: a fixed order (deterministic),
// and independent sums the compiler can keep in one vector register (one running sum would wait on the latency
// of every add).
constexpr int64_t kLanes = 8;
template <typename S, typename T>
S dot(const T* a, const T* b, int64_t n) {
  S part[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= n; p += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) part[j] += static_cast<S>(a[p + j]) * static_cast<S>(b[p + j]);
  }
  for (; p < n; ++p) part[p % kLanes] += static_cast<S>(a[p]) * static_cast<S>(b[p]);
  S acc = 0;
  for (int64_t j = 0; j < kLanes; ++j) acc += part[j];
  return acc;
}

// dst = src * gate(n, c) for every element, walking src's layout (src: x forward, grad_out backward).  With
// per_sample (need_mask), also per_sample[n, c] = sum over the positions of src * x.
template <typename T>
void gate_pass(const T* src, const T* x, const Gate<T>& gate, const CsgShape& s, T* dst,
               Acc<T>* per_sample) {
  using A = at::opmath_type<T>;
  using S = Acc<T>;
  if (!s.channels_last) {
    // rows (n, c) of HW contiguous positions
    at::parallel_for(0, s.N * s.C, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(s.HW, 1)), [&](int64_t b,
                                                                                                       int64_t e) {
      for (int64_t row = b; row < e; ++row) {
        const int64_t n = row / s.C, c = row % s.C, off = row * s.HW;
        if (dst != nullptr) {
          const A f = gate(n, c);
          for (int64_t p = 0; p < s.HW; ++p) dst[off + p] = static_cast<T>(static_cast<A>(src[off + p]) * f);
        }
        if (per_sample != nullptr) per_sample[row] = dot<S>(src + off, x + off, s.HW);
      }
    });
    return;
  }
  // NHWC: per sample, its C gates gathered once; positions with their C channels contiguous
  at::parallel_for(0, s.N, 1, [&](int64_t b, int64_t e) {
    std::vector<A> f(s.C);
    std::vector<S> acc(s.C);
    for (int64_t n = b; n < e; ++n) {
      for (int64_t c = 0; c < s.C; ++c) f[c] = dst != nullptr ? gate(n, c) : A(0);
      std::fill(acc.begin(), acc.end(), S(0));
      for (int64_t p = 0; p < s.HW; ++p) {
        const int64_t off = (n * s.HW + p) * s.C;
        if (dst != nullptr) {
          for (int64_t c = 0; c < s.C; ++c) dst[off + c] = static_cast<T>(static_cast<A>(src[off + c]) * f[c]);
        }
        if (per_sample != nullptr) {
          for (int64_t c = 0; c < s.C; ++c) acc[c] += static_cast<S>(src[off + c]) * static_cast<S>(x[off + c]);
        }
      }
      if (per_sample != nullptr) std::copy(acc.begin(), acc.end(), per_sample + n * s.C);
    }
  });
}

// grad_mask[c, k] = sum over the samples n of class k, in batch order, of per_sample[n, c]: accumulated in
// grad_mask itself when it has the sums' type (most of its K columns stay 0 when K >> N: one memset), else in
// a row of sums per c.
template <typename T>
void class_sums(const Acc<T>* per_sample, const int64_t* labels, const CsgShape& s, T* grad_mask) {
  at::parallel_for(0, s.C, 64, [&](int64_t b, int64_t e) {
    if constexpr (std::is_same_v<Acc<T>, T>) {
      std::fill(grad_mask + b * s.K, grad_mask + e * s.K, T(0));
      for (int64_t c = b; c < e; ++c) {
        for (int64_t n = 0; n < s.N; ++n) grad_mask[c * s.K + labels[n]] += per_sample[n * s.C + c];
      }
    } else {
      std::vector<Acc<T>> acc(s.K);
      for (int64_t c = b; c < e; ++c) {
        std::fill(acc.begin(), acc.end(), Acc<T>(0));
        for (int64_t n = 0; n < s.N; ++n) acc[labels[n]] += per_sample[n * s.C + c];
        for (int64_t k = 0; k < s.K; ++k) grad_mask[c * s.K + k] = static_cast<T>(acc[k]);
      }
    }
  });
}

}  // namespace

at::Tensor csg_gate_forward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& labels) {
  const auto t = bcos_checks::csg_forward_tensors<CpuDevice>(x, mask, labels);
  if (t.out.numel() == 0) return t.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.x.scalar_type(), "csg_gate_forward", [&] {
    const Gate<scalar_t> gate{t.mask.const_data_ptr<scalar_t>(), t.labels.const_data_ptr<int64_t>(), t.shape.K};
    gate_pass<scalar_t>(t.x.const_data_ptr<scalar_t>(), nullptr, gate, t.shape, t.out.data_ptr<scalar_t>(), nullptr);
  });
  return t.out;
}

std::tuple<at::Tensor, at::Tensor> csg_gate_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& x,
                                                     const std::optional<at::Tensor>& mask, const at::Tensor& labels,
                                                     int64_t num_classes, bool need_x, bool need_mask) {
  auto t = bcos_checks::csg_backward_tensors<CpuDevice>(grad_out, x, mask, labels, num_classes, need_x, need_mask);
  if (!need_mask && t.grad_x.numel() == 0) return {t.grad_x, t.grad_mask};
  if (need_mask && t.shape.N * t.shape.C * t.shape.HW == 0) {
    t.grad_mask.zero_();  // empty sums
    return {t.grad_x, t.grad_mask};
  }
  const auto acc_opts = t.grad_out.options().dtype(bcos_checks::acc_dtype(t.grad_out.scalar_type()));
  at::Tensor per_sample = need_mask ? at::empty({t.shape.N, t.shape.C}, acc_opts) : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.grad_out.scalar_type(), "csg_gate_backward", [&] {
    using S = Acc<scalar_t>;
    const Gate<scalar_t> gate{need_x ? t.mask.const_data_ptr<scalar_t>() : nullptr,
                              t.labels.const_data_ptr<int64_t>(), t.shape.K};
    gate_pass<scalar_t>(t.grad_out.const_data_ptr<scalar_t>(), need_mask ? t.x.const_data_ptr<scalar_t>() : nullptr,
                        gate, t.shape, need_x ? t.grad_x.data_ptr<scalar_t>() : nullptr,
                        need_mask ? per_sample.data_ptr<S>() : nullptr);
    if (need_mask) {
      class_sums<scalar_t>(per_sample.const_data_ptr<S>(), t.labels.const_data_ptr<int64_t>(), t.shape,
                           t.grad_mask.data_ptr<scalar_t>());
    }
  });
  return {t.grad_x, t.grad_mask};
}

}  // namespace cpu
}  // namespace bcos_kernels
