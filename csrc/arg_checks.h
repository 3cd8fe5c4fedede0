// Argument checks shared by the torch glue of the CPU (csrc/cpu) and CUDA
// (csrc/cuda/ops_cuda.cpp) ops.  ATen-aware, so not in csrc/common, whose
// headers are plain C++/CUDA.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

namespace bcos_checks {

// The optional per-output-channel factor of the B-cos forward: (O,) with O the
// output channels after MaxOut, lin's dtype and device.  Returns it contiguous,
// or an undefined tensor when absent (the kernels then get a null pointer).
inline at::Tensor check_channel_scale(const std::optional<at::Tensor>& channel_scale, const at::Tensor& lin,
                                      int64_t O) {
  if (!channel_scale.has_value() || !channel_scale->defined()) return at::Tensor();
  const at::Tensor& cs = *channel_scale;
  TORCH_CHECK(cs.device() == lin.device(), "channel_scale must be on the device of lin (", lin.device(), "), got ",
              cs.device());
  TORCH_CHECK(cs.dim() == 1, "channel_scale must have 1 dimension (out_channels,), got shape ", cs.sizes());
  TORCH_CHECK(cs.size(0) == O, "channel_scale must have ", O,
              " elements (lin's channels / max_out, the output channels), got ", cs.size(0));
  TORCH_CHECK(cs.scalar_type() == lin.scalar_type(), "channel_scale has dtype ", cs.scalar_type(),
              " but lin has dtype ", lin.scalar_type());
  return cs.contiguous();
}

// A two-element int list argument (kernel_size, stride, ...), each >= minimum.
inline std::pair<int64_t, int64_t> pair_arg(at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, name, " must have 2 elements, got ", v.size());
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, name, " must be >= ", minimum, ", got ", v);
  return {v[0], v[1]};
}

// The checked patch geometry of x (N, C, H, W); Geom is a struct with the
// int64 fields N, C, H, W, G, Cg, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw
// (the CPU's and the CUDA launchers' own structs).
template <typename Geom>
Geom make_geometry(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "x must have 4 dimensions (N, C, H, W), got shape ", x.sizes());
  Geom g{};
  std::tie(g.kh, g.kw) = pair_arg(kernel_size, "kernel_size", 1);
  std::tie(g.sh, g.sw) = pair_arg(stride, "stride", 1);
  std::tie(g.ph, g.pw) = pair_arg(padding, "padding", 0);
  std::tie(g.dh, g.dw) = pair_arg(dilation, "dilation", 1);
  TORCH_CHECK(groups >= 1, "groups must be >= 1, got ", groups);
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.G = groups;
  TORCH_CHECK(g.C % groups == 0, "x has ", g.C, " channels, which is not divisible by groups=", groups);
  g.Cg = g.C / groups;
  const int64_t span_h = g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1;
  const int64_t span_w = g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, "the (dilated) kernel ", kernel_size,
              " is larger than the padded input of x (", g.H, " x ", g.W, ", padding ", padding, ")");
  g.Ho = span_h / g.sh + 1;
  g.Wo = span_w / g.sw + 1;
  return g;
}

// NHWC memory (channels_last but not NCHW-contiguous): both backends then walk
// channels fastest; anything else is processed as NCHW.
inline bool use_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace bcos_checks
