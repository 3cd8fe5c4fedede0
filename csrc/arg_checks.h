// Argument checks shared by the torch glue of the CPU (csrc/cpu) and CUDA
// (csrc/cuda/ops_cuda.cpp) ops.  ATen-aware, so not in csrc/common, whose
// headers are plain C++/CUDA.
#pragma once

#include <ATen/ATen.h>

#include <optional>

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

}  // namespace bcos_checks
