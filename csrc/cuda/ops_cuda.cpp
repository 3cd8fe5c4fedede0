// CUDA registrations of the bcos_kernels ops: argument checks, output
// allocation and a call of the plain-CUDA launcher (csrc/cuda/kernels.h) on
// the current stream of the tensors' device.  Compiled only when torch has
// CUDA (setup.py); schemas: csrc/ops.cpp and csrc/cuda_schemas.cpp.
//
// The checks and output conventions mirror the CPU ops (csrc/cpu/bcos_cpu.cpp)
// so that both backends accept and return the same things.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "arg_checks.h"
#include "common/bcos_math.h"
#include "common/dau_math.h"
#include "cuda/kernels.h"

namespace bcos_kernels {
namespace cuda_ops {
namespace {

namespace kc = bcos_kernels::cuda;
using bcos_checks::acc_dtype;
using bcos_checks::check_same_dtype;
using bcos_checks::make_geometry;
using bcos_checks::use_channels_last;

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

// The device checks of bcos_checks (arg_checks.h): the op's first tensor on a
// CUDA device, the others on its device.
struct CudaDevice {
  static void check(const at::Tensor& t, const char* name) { check_cuda(t, name); }
  static void check_with(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
    check_same_device(t, name, ref, ref_name);
  }
};

kc::DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kc::DType::kFloat32;
    case at::kDouble:
      return kc::DType::kFloat64;
    case at::kBFloat16:
      return kc::DType::kBFloat16;
    case at::kHalf:
      return kc::DType::kFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, name, " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
  return kc::DType::kFloat32;  // not reached
}

cudaStream_t current_stream(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

// ---------------------------------------------------------------------------
// B-cos.
// ---------------------------------------------------------------------------
kc::Strides4 strides4(const at::Tensor& t) { return kc::Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

at::Tensor patch_norm(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const auto g = bcos_checks::check_patch_norm_args<CudaDevice, kc::PatchGeometry>(x, kernel_size, stride, padding,
                                                                                  dilation, groups);
  const kc::DType dt = dtype_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor norm = at::empty({g.N, g.G, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (norm.numel() == 0) return norm;
  at::Tensor sq = at::empty({g.N, g.G, g.H, g.W}, x.options().dtype(acc_dtype(x.scalar_type())));
  C10_CUDA_CHECK(kc::patch_norm(dt, x.const_data_ptr(), strides4(x), use_channels_last(x), g, sq.data_ptr(),
                                norm.data_ptr(), current_stream(x)));
  return norm;
}

at::Tensor patch_norm_backward(const at::Tensor& grad_norm_in, const at::Tensor& x, const at::Tensor& norm_in,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups) {
  const auto g = bcos_checks::check_patch_norm_backward_args<CudaDevice, kc::PatchGeometry>(
      grad_norm_in, x, norm_in, kernel_size, stride, padding, dilation, groups);
  const kc::DType dt = dtype_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const bool cl = use_channels_last(x);
  at::Tensor grad_x = at::empty(
      x.sizes(), x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (grad_x.numel() == 0) return grad_x;
  const at::Tensor grad_norm = grad_norm_in.contiguous();
  const at::Tensor norm = norm_in.contiguous();
  at::Tensor r = at::empty({g.N, g.G, g.H, g.W}, x.options().dtype(acc_dtype(x.scalar_type())));
  C10_CUDA_CHECK(kc::patch_norm_backward(dt, grad_norm.const_data_ptr(), norm.const_data_ptr(), x.const_data_ptr(),
                                         strides4(x), grad_x.data_ptr(), strides4(grad_x), cl, g, r.data_ptr(),
                                         current_stream(x)));
  return grad_x;
}

// The checks of bcos_checks::check_scale_args, and the problem they describe.
kc::ScaleProblem check_scale_args(const char* lin_name, const at::Tensor& lin, int64_t lin_channels_per_out,
                                  const at::Tensor& norm, int mode, int64_t max_out, double b, double scale) {
  auto s = bcos_checks::check_scale_args<CudaDevice, kc::ScaleProblem>(lin_name, lin, lin_channels_per_out, norm,
                                                                       mode, max_out, scale);
  s.mode = mode;
  s.b = b;
  s.scale = scale;
  return s;
}

using bcos_checks::check_channel_scale;

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bcos_scale_forward(const at::Tensor& lin_in, const at::Tensor& norm_in,
                                                                  double b, bool b_is_tensor, int64_t max_out,
                                                                  double scale,
                                                                  const std::optional<at::Tensor>& channel_scale_in) {
  const int mode = bcos_math::scale_mode(b, b_is_tensor);
  const kc::ScaleProblem s = check_scale_args("lin", lin_in, max_out, norm_in, mode, max_out, b, scale);
  const at::Tensor channel_scale = check_channel_scale(channel_scale_in, lin_in, s.O);
  const c10::cuda::CUDAGuard guard(lin_in.device());
  const at::Tensor lin = lin_in.contiguous();
  const at::Tensor norm = mode == bcos_math::kModeOne ? norm_in : norm_in.contiguous();
  auto [out, lin_max, winner] = bcos_checks::scale_forward_outputs(lin, s);
  if (out.numel() == 0) return {out, lin_max, winner};
  C10_CUDA_CHECK(kc::bcos_scale_forward(dtype_of(lin, "lin"), lin.const_data_ptr(),
                                        mode == bcos_math::kModeOne ? nullptr : norm.const_data_ptr(),
                                        out.data_ptr(), s.M > 1 ? lin_max.data_ptr() : nullptr,
                                        s.M > 1 ? winner.data_ptr<uint8_t>() : nullptr, data_or_null(channel_scale),
                                        s, current_stream(lin)));
  return {out, lin_max, winner};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bcos_conv_scale_forward(
    const at::Tensor& lin_in, const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, double b, bool b_is_tensor, int64_t max_out,
    double scale, const std::optional<at::Tensor>& channel_scale_in) {
  const int mode = bcos_math::scale_mode(b, b_is_tensor);
  check_cuda(x, "x");
  check_same_device(lin_in, "lin", x, "x");
  check_same_dtype(lin_in, "lin", x, "x");
  const kc::PatchGeometry g = make_geometry<kc::PatchGeometry>(x, kernel_size, stride, padding, dilation, groups);
  TORCH_CHECK(lin_in.dim() == 3 && lin_in.size(0) == g.N && lin_in.size(2) == g.Ho * g.Wo,
              "lin must have shape (", g.N, ", out_channels * max_out, ", g.Ho * g.Wo, ") for this x and geometry, got ",
              lin_in.sizes());
  if (mode == bcos_math::kModeOne) {
    // b == 1 needs no norm: the plain scale pass, and an empty norm (as the fused Python path)
    auto [out, lin_max, winner] = bcos_scale_forward(lin_in, at::Tensor(), b, b_is_tensor, max_out, scale,
                                                     channel_scale_in);
    return {out, lin_max, winner, at::empty({0}, x.options())};
  }
  TORCH_CHECK(max_out >= 1 && max_out <= 255, "max_out must be in [1, 255], got ", max_out);
  TORCH_CHECK(scale != 0.0, "scale must be non-zero");
  TORCH_CHECK(lin_in.size(1) % max_out == 0, "lin has ", lin_in.size(1),
              " channels, which is not divisible by max_out=", max_out);
  kc::ScaleProblem s{};
  s.N = g.N;
  s.O = lin_in.size(1) / max_out;
  s.M = max_out;
  s.P = g.Ho * g.Wo;
  s.G = g.G;
  s.mode = mode;
  s.b = b;
  s.scale = scale;
  TORCH_CHECK(s.O % s.G == 0, "groups=", s.G, " does not divide the ", s.O, " output channels");
  const at::Tensor channel_scale = check_channel_scale(channel_scale_in, lin_in, s.O);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor lin = lin_in.contiguous();
  at::Tensor norm = at::empty({g.N, g.G, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::Contiguous));
  auto [out, lin_max, winner] = bcos_checks::scale_forward_outputs(lin, s);
  if (norm.numel() == 0) return {out, lin_max, winner, norm};
  at::Tensor sq = at::empty({g.N, g.G, g.H, g.W}, x.options().dtype(acc_dtype(x.scalar_type())));
  C10_CUDA_CHECK(kc::bcos_conv_scale_forward(
      dtype_of(x, "x"), lin.const_data_ptr(), x.const_data_ptr(), strides4(x), use_channels_last(x), g,
      sq.data_ptr(), norm.data_ptr(), out.data_ptr(), s.M > 1 ? lin_max.data_ptr() : nullptr,
      s.M > 1 ? winner.data_ptr<uint8_t>() : nullptr, data_or_null(channel_scale), s, current_stream(x)));
  return {out, lin_max, winner, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bcos_scale_backward(
    const at::Tensor& grad_out_in, const at::Tensor& lin_max_in, const at::Tensor& norm_in,
    const at::Tensor& winner_in, double b, bool b_is_tensor, int64_t max_out, double scale, bool detach,
    bool need_grad_norm, bool need_grad_b) {
  const int mode = bcos_math::scale_mode(b, b_is_tensor);
  const kc::ScaleProblem s = check_scale_args("lin_max", lin_max_in, 1, norm_in, mode, max_out, b, scale);
  bcos_checks::check_scale_backward_args<CudaDevice>(grad_out_in, lin_max_in, winner_in, s.M);
  const c10::cuda::CUDAGuard guard(lin_max_in.device());
  const bcos_checks::ScaleBackwardTensors t = bcos_checks::scale_backward_tensors(
      grad_out_in, lin_max_in, norm_in, winner_in, s, mode, detach, need_grad_norm, need_grad_b);
  if (t.grad_lin.numel() == 0) return t.outputs();
  const auto double_opts = t.grad_out.options().dtype(at::kDouble);
  at::Tensor partials = t.need_db ? at::empty({kc::bcos_scale_backward_partials(s)}, double_opts)
                                  : at::empty({0}, double_opts);
  C10_CUDA_CHECK(kc::bcos_scale_backward(
      dtype_of(t.grad_out, "grad_out"), t.grad_out.const_data_ptr(), t.lin_max.const_data_ptr(),
      mode == bcos_math::kModeOne ? nullptr : t.norm.const_data_ptr(),
      s.M > 1 ? t.winner.const_data_ptr<uint8_t>() : nullptr, t.grad_lin.data_ptr(),
      t.need_dn ? t.grad_norm.data_ptr() : nullptr, t.need_db ? t.grad_b.data_ptr() : nullptr,
      t.need_db ? partials.data_ptr<double>() : nullptr, s, detach, current_stream(t.grad_out)));
  return t.outputs();
}

// ---------------------------------------------------------------------------
// DAU epilogue.
// ---------------------------------------------------------------------------
int dau_norm_kind(std::string_view norm) {
  if (norm == "squash") return bcos_math::kDauSquash;
  if (norm == "l2") return bcos_math::kDauL2;
  TORCH_CHECK(false, "norm must be \"squash\" or \"l2\", got \"", std::string(norm), "\"");
  return bcos_math::kDauSquash;  // not reached
}

kc::Matrix matrix(const at::Tensor& t) { return kc::Matrix{t.const_data_ptr(), t.stride(0), t.stride(1)}; }

void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows, ", ", cols,
              "), got ", t.sizes());
}

// Checks of y, z, gram shared by forward and backward; returns the problem.
kc::DauProblem check_dau_args(const at::Tensor& y, const at::Tensor& z, const at::Tensor& gram,
                              std::string_view norm) {
  check_cuda(y, "y");
  check_same_device(z, "z", y, "y");
  check_same_device(gram, "gram", y, "y");
  dtype_of(y, "y");
  check_same_dtype(z, "z", y, "y");
  TORCH_CHECK(gram.scalar_type() == acc_dtype(y.scalar_type()), "gram must have dtype ",
              acc_dtype(y.scalar_type()), " (the accumulation dtype of y's ", y.scalar_type(), "), got ",
              gram.scalar_type());
  TORCH_CHECK(z.dim() == 2, "z must have 2 dimensions (pixels, rank), got shape ", z.sizes());
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2), "gram must have shape (O, R, R), got ", gram.sizes());
  kc::DauProblem d{};
  d.P = z.size(0);
  d.O = gram.size(0);
  TORCH_CHECK(z.size(1) >= 1 && z.size(1) < kc::kDauMaxRank, "z must have between 1 and ", kc::kDauMaxRank - 1,
              " columns (the rank), got ", z.size(1));
  d.r = static_cast<int>(z.size(1));
  TORCH_CHECK(gram.size(1) == d.r || gram.size(1) == d.r + 1, "gram must be (O, R, R) with R = rank (", d.r,
              ", no bias) or rank + 1 (", d.r + 1, ", with bias), got ", gram.sizes());
  d.R = static_cast<int>(gram.size(1));
  d.norm = dau_norm_kind(norm);
  check_matrix(y, "y", d.P, d.O * d.R);
  return d;
}

std::tuple<at::Tensor, at::Tensor> dau_combine_forward(const at::Tensor& y, const at::Tensor& z,
                                                       const at::Tensor& gram_in, std::string_view norm) {
  const kc::DauProblem d = check_dau_args(y, z, gram_in, norm);
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor gram = gram_in.contiguous();
  at::Tensor out = at::empty({d.P, d.O}, y.options());
  at::Tensor s = at::empty({d.P, d.O}, y.options().dtype(acc_dtype(y.scalar_type())));
  if (out.numel() == 0) return {out, s};
  C10_CUDA_CHECK(kc::dau_forward(dtype_of(y, "y"), matrix(y), matrix(z), gram.const_data_ptr(), d, out.data_ptr(),
                                 s.data_ptr(), current_stream(y)));
  return {out, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dau_combine_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                                                    const at::Tensor& z, const at::Tensor& s,
                                                                    const at::Tensor& gram_in, std::string_view norm,
                                                                    bool detach, bool need_dz, bool need_dy,
                                                                    bool need_m) {
  const kc::DauProblem d = check_dau_args(y, z, gram_in, norm);
  check_same_device(grad_out, "grad_out", y, "y");
  check_same_device(s, "s", y, "y");
  check_same_dtype(grad_out, "grad_out", y, "y");
  check_matrix(grad_out, "grad_out", d.P, d.O);
  check_matrix(s, "s", d.P, d.O);
  TORCH_CHECK(s.scalar_type() == acc_dtype(y.scalar_type()), "s must have dtype ", acc_dtype(y.scalar_type()),
              " (as dau_combine_forward returns it), got ", s.scalar_type());
  TORCH_CHECK(!(detach && (need_dz || need_m)),
              "detach=True: z and the filters get no gradient through the norms; need_dz and need_m must be False");
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor gram = gram_in.contiguous();
  const auto acc_opts = y.options().dtype(acc_dtype(y.scalar_type()));
  at::Tensor dz = need_dz ? at::empty({d.P, d.r}, y.options()) : at::empty({0}, y.options());
  at::Tensor dy = need_dy ? at::empty({d.P, d.O * d.R}, y.options()) : at::empty({0}, y.options());
  at::Tensor m = need_m ? at::empty({d.O, d.R, d.R}, acc_opts) : at::empty({0}, acc_opts);
  if (!(need_dz || need_dy || need_m)) return {dz, dy, m};
  at::Tensor workspace = at::empty({kc::dau_backward_workspace_elems(d, need_m)}, acc_opts);
  C10_CUDA_CHECK(kc::dau_backward(dtype_of(y, "y"), matrix(grad_out), matrix(y), matrix(z), matrix(s),
                                  gram.const_data_ptr(), d, detach, need_dz ? dz.data_ptr() : nullptr,
                                  need_dy ? dy.data_ptr() : nullptr, need_m ? m.data_ptr() : nullptr,
                                  workspace.data_ptr(), current_stream(y)));
  return {dz, dy, m};
}

// ---------------------------------------------------------------------------
// LWTA.
// ---------------------------------------------------------------------------

// The kernels' problem: the checked (outer, C, inner) view of x (bcos_checks::check_lwta_args) and the options.
kc::LwtaProblem lwta_problem(const at::Tensor& x, int64_t competitors, double temperature, bool deterministic,
                             int64_t seed, int64_t offset) {
  const bcos_checks::LwtaShape s = bcos_checks::check_lwta_args(x, competitors, temperature, deterministic);
  kc::LwtaProblem p{};
  p.outer = s.outer;
  p.C = s.C;
  p.inner = s.inner;
  p.U = static_cast<int>(competitors);
  p.temperature = temperature;
  p.deterministic = deterministic;
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  return p;
}

std::tuple<at::Tensor, at::Tensor> lwta_block_forward(const at::Tensor& x_in, int64_t competitors, double temperature,
                                                bool deterministic, const std::optional<at::Tensor>& noise_in,
                                                int64_t seed, int64_t offset) {
  check_cuda(x_in, "x");
  const kc::DType dt = dtype_of(x_in, "x");
  const kc::LwtaProblem p = lwta_problem(x_in, competitors, temperature, deterministic, seed, offset);
  const at::Tensor noise = bcos_checks::lwta_noise<CudaDevice>(noise_in, x_in, deterministic);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor winner = at::empty(bcos_checks::lwta_winner_shape(x, competitors), x.options().dtype(at::kByte));
  if (out.numel() == 0) return {out, winner};
  C10_CUDA_CHECK(kc::lwta_forward(dt, x.const_data_ptr(), noise.defined() ? noise.const_data_ptr() : nullptr,
                                  noise.defined() ? dtype_of(noise, "noise") : kc::DType::kFloat32, p,
                                  out.data_ptr(), winner.data_ptr<uint8_t>(), current_stream(x)));
  return {out, winner};
}

at::Tensor lwta_block_backward(const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& winner_in,
                         int64_t competitors, double temperature, bool deterministic,
                         const std::optional<at::Tensor>& noise_in, int64_t seed, int64_t offset) {
  check_cuda(x_in, "x");
  const kc::DType dt = dtype_of(x_in, "x");
  bcos_checks::check_lwta_backward_args<CudaDevice>(grad_out_in, x_in, winner_in, competitors);
  const kc::LwtaProblem p = lwta_problem(x_in, competitors, temperature, deterministic, seed, offset);
  const at::Tensor noise = bcos_checks::lwta_noise<CudaDevice>(noise_in, x_in, deterministic);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor winner = winner_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  if (grad_x.numel() == 0) return grad_x;
  C10_CUDA_CHECK(kc::lwta_backward(dt, grad_out.const_data_ptr(), x.const_data_ptr(),
                                   winner.const_data_ptr<uint8_t>(),
                                   noise.defined() ? noise.const_data_ptr() : nullptr,
                                   noise.defined() ? dtype_of(noise, "noise") : kc::DType::kFloat32, p,
                                   grad_x.data_ptr(), current_stream(x)));
  return grad_x;
}

at::Tensor lwta_uniform(const at::Tensor& x, int64_t seed, int64_t offset) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor u = at::empty(x.sizes(), x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::Contiguous));
  C10_CUDA_CHECK(kc::lwta_uniform(u.data_ptr<float>(), u.numel(), static_cast<uint64_t>(seed),
                                  static_cast<uint64_t>(offset), current_stream(x)));
  return u;
}

// ---------------------------------------------------------------------------
// Class-specific gate.
// ---------------------------------------------------------------------------

// The kernels' problem for the checked shape (bcos_checks::csg_shape).
kc::CsgProblem csg_problem(const bcos_checks::CsgShape& l) { return kc::CsgProblem{l.N, l.C, l.HW, l.K, l.channels_last}; }

at::Tensor csg_gate_forward(const at::Tensor& x_in, const at::Tensor& mask_in, const at::Tensor& labels_in) {
  const auto t = bcos_checks::csg_forward_tensors<CudaDevice>(x_in, mask_in, labels_in);
  if (t.out.numel() == 0) return t.out;
  const c10::cuda::CUDAGuard guard(x_in.device());
  C10_CUDA_CHECK(kc::csg_forward(dtype_of(t.x, "x"), t.x.const_data_ptr(), t.mask.const_data_ptr(),
                                 t.labels.const_data_ptr<int64_t>(), csg_problem(t.shape), t.out.data_ptr(),
                                 current_stream(t.x)));
  return t.out;
}

std::tuple<at::Tensor, at::Tensor> csg_gate_backward(const at::Tensor& grad_out_in,
                                                     const std::optional<at::Tensor>& x_in,
                                                     const std::optional<at::Tensor>& mask_in,
                                                     const at::Tensor& labels_in, int64_t num_classes, bool need_x,
                                                     bool need_mask) {
  auto t = bcos_checks::csg_backward_tensors<CudaDevice>(grad_out_in, x_in, mask_in, labels_in, num_classes, need_x,
                                                          need_mask);
  if (!need_x && !need_mask) return {t.grad_x, t.grad_mask};
  const c10::cuda::CUDAGuard guard(grad_out_in.device());
  const auto acc_opts = t.grad_out.options().dtype(acc_dtype(t.grad_out.scalar_type()));
  at::Tensor per_sample = need_mask ? at::empty({t.shape.N, t.shape.C}, acc_opts) : at::empty({0}, acc_opts);
  C10_CUDA_CHECK(kc::csg_backward(dtype_of(t.grad_out, "grad_out"), t.grad_out.const_data_ptr(),
                                  need_mask ? t.x.const_data_ptr() : nullptr,
                                  need_x ? t.mask.const_data_ptr() : nullptr, t.labels.const_data_ptr<int64_t>(),
                                  csg_problem(t.shape), need_x ? t.grad_x.data_ptr() : nullptr,
                                  need_mask ? t.grad_mask.data_ptr() : nullptr,
                                  need_mask ? per_sample.data_ptr() : nullptr, current_stream(t.grad_out)));
  return {t.grad_x, t.grad_mask};
}

}  // namespace
}  // namespace cuda_ops
}  // namespace bcos_kernels

// Each op is registered under the name of its function here (the schema's
// name: csrc/ops.cpp, csrc/cuda_schemas.cpp).
#define BCOS_KERNELS_CUDA_IMPL(op) m.impl(#op, &bcos_kernels::cuda_ops::op)

TORCH_LIBRARY_IMPL(bcos_kernels, CUDA, m) {
  BCOS_KERNELS_CUDA_IMPL(patch_norm);
  BCOS_KERNELS_CUDA_IMPL(patch_norm_backward);
  BCOS_KERNELS_CUDA_IMPL(bcos_scale_forward);
  BCOS_KERNELS_CUDA_IMPL(bcos_scale_backward);
  BCOS_KERNELS_CUDA_IMPL(bcos_conv_scale_forward);
  BCOS_KERNELS_CUDA_IMPL(dau_combine_forward);
  BCOS_KERNELS_CUDA_IMPL(dau_combine_backward);
  BCOS_KERNELS_CUDA_IMPL(lwta_block_forward);
  BCOS_KERNELS_CUDA_IMPL(lwta_block_backward);
  BCOS_KERNELS_CUDA_IMPL(lwta_uniform);
  BCOS_KERNELS_CUDA_IMPL(csg_gate_forward);
  BCOS_KERNELS_CUDA_IMPL(csg_gate_backward);
}

#undef BCOS_KERNELS_CUDA_IMPL
