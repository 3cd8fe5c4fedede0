// Argument checks shared by the torch glue of the CPU (csrc/cpu) and CUDA
// (csrc/cuda/ops_cuda.cpp) ops.  ATen-aware, so not in csrc/common, whose
// headers are plain C++/CUDA.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common/bcos_math.h"

namespace bcos_checks {

// The checks below that take a `Device` parameter use the backend's device
// checks, a struct with
//   static void check(const at::Tensor& t, const char* name);
//       t is on the backend's device (the op's first tensor);
//   static void check_with(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name);
//       t may be used with ref (a further tensor of the op).
// (bcos_kernels::cpu::CpuDevice, bcos_kernels::cuda_ops::CudaDevice.)

// The storage dtypes of the kernels.
inline void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, name,
              " must be float32, float64, bfloat16 or float16, got ", dt);
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type());
}

// The accumulation dtype of the kernels for storage dtype st.
inline at::ScalarType acc_dtype(at::ScalarType st) { return st == at::kDouble ? at::kDouble : at::kFloat; }

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

// x of patch_norm: on the device, a float dtype, and its checked geometry.
template <typename Device, typename Geom>
Geom check_patch_norm_args(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  Device::check(x, "x");
  check_float_dtype(x, "x");
  return make_geometry<Geom>(x, kernel_size, stride, padding, dilation, groups);
}

// The arguments of patch_norm_backward: x as in patch_norm, grad_norm and norm
// (N, G, Ho, Wo) with x's device and dtype.
template <typename Device, typename Geom>
Geom check_patch_norm_backward_args(const at::Tensor& grad_norm, const at::Tensor& x, const at::Tensor& norm,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups) {
  Device::check(x, "x");
  Device::check_with(grad_norm, "grad_norm", x, "x");
  Device::check_with(norm, "norm", x, "x");
  check_float_dtype(x, "x");
  const Geom g = make_geometry<Geom>(x, kernel_size, stride, padding, dilation, groups);
  const std::vector<int64_t> norm_shape{g.N, g.G, g.Ho, g.Wo};
  TORCH_CHECK(grad_norm.sizes() == at::IntArrayRef(norm_shape), "grad_norm must have shape ", norm_shape, ", got ",
              grad_norm.sizes());
  TORCH_CHECK(norm.sizes() == at::IntArrayRef(norm_shape), "norm must have shape ", norm_shape, ", got ",
              norm.sizes());
  check_same_dtype(grad_norm, "grad_norm", x, "x");
  check_same_dtype(norm, "norm", x, "x");
  return g;
}

// ---------------------------------------------------------------------------
// The dynamic scale ops (bcos_scale_forward / bcos_scale_backward).
// ---------------------------------------------------------------------------

// Checks shared by forward and backward.  `lin_name`/`lin` is lin (forward,
// (N, O * M, P)) or lin_max (backward, (N, O, P)); `lin_channels_per_out` is M
// or 1.  Shapes: a struct with the int64 fields N, O, M, P, G (set here; any
// others are value-initialised).  mode: bcos_math::ScaleMode (mode one reads
// no norm).
template <typename Device, typename Shapes>
Shapes check_scale_args(const char* lin_name, const at::Tensor& lin, int64_t lin_channels_per_out,
                        const at::Tensor& norm, int mode, int64_t max_out, double scale) {
  Device::check(lin, lin_name);
  check_float_dtype(lin, lin_name);
  TORCH_CHECK(lin.dim() == 3, lin_name, " must have 3 dimensions (N, channels, positions), got shape ", lin.sizes());
  TORCH_CHECK(max_out >= 1 && max_out <= 255, "max_out must be in [1, 255], got ", max_out);
  TORCH_CHECK(scale != 0.0, "scale must be non-zero");
  Shapes s{};
  s.N = lin.size(0);
  s.P = lin.size(2);
  s.M = max_out;
  TORCH_CHECK(lin.size(1) % lin_channels_per_out == 0, lin_name, " has ", lin.size(1),
              " channels, which is not divisible by max_out=", max_out);
  s.O = lin.size(1) / lin_channels_per_out;
  s.G = 1;
  if (mode != bcos_math::kModeOne) {
    Device::check_with(norm, "norm", lin, lin_name);
    TORCH_CHECK(norm.dim() == 3, "norm must have 3 dimensions (N, G, positions), got shape ", norm.sizes());
    check_same_dtype(norm, "norm", lin, lin_name);
    TORCH_CHECK(norm.size(0) == s.N && norm.size(2) == s.P, "norm must have shape (", s.N, ", G, ", s.P, "), got ",
                norm.sizes());
    s.G = norm.size(1);
    TORCH_CHECK(s.G >= 1 && s.O % s.G == 0, "norm has ", s.G, " channels (groups), which does not divide the ", s.O,
                " output channels");
  }
  return s;
}

// The outputs of the forward, (N, O, P) like lin: out, and lin_max and winner
// (uint8) with max_out > 1.  With max_out == 1 the latter two are empty: an
// output may not alias an input of the op (its schema has no alias
// annotation), so lin_max is not returned as `lin` itself; the caller uses lin
// as lin_max.
template <typename Shapes>
std::tuple<at::Tensor, at::Tensor, at::Tensor> scale_forward_outputs(const at::Tensor& lin, const Shapes& s) {
  const std::vector<int64_t> shape = s.M > 1 ? std::vector<int64_t>{s.N, s.O, s.P} : std::vector<int64_t>{0};
  return {at::empty({s.N, s.O, s.P}, lin.options()), at::empty(shape, lin.options()),
          at::empty(shape, lin.options().dtype(at::kByte))};
}

// grad_out (lin_max's shape and dtype) and winner (uint8, lin_max's shape,
// checked only with max_out > 1) of the backward.
template <typename Device>
void check_scale_backward_args(const at::Tensor& grad_out, const at::Tensor& lin_max, const at::Tensor& winner,
                               int64_t max_out) {
  Device::check_with(grad_out, "grad_out", lin_max, "lin_max");
  TORCH_CHECK(grad_out.sizes() == lin_max.sizes(), "grad_out must have the shape of lin_max ", lin_max.sizes(),
              ", got ", grad_out.sizes());
  check_same_dtype(grad_out, "grad_out", lin_max, "lin_max");
  if (max_out > 1) {
    Device::check_with(winner, "winner", lin_max, "lin_max");
    TORCH_CHECK(winner.scalar_type() == at::kByte, "winner must be uint8, got ", winner.scalar_type());
    TORCH_CHECK(winner.sizes() == lin_max.sizes(), "winner must have the shape of lin_max ", lin_max.sizes(),
                ", got ", winner.sizes());
  }
}

// The tensors of the backward: which gradients are computed (need_dn:
// grad_norm, not with detach or in mode one; need_db: grad_b, general mode
// only), the inputs made contiguous and the outputs -- grad_lin (N, O * M, P),
// grad_norm (N, G, P) or empty, grad_b (a scalar in the accumulation dtype)
// or empty.  When grad_lin is empty, grad_norm and grad_b are zeroed (empty
// sums) and the op returns outputs() at once.
struct ScaleBackwardTensors {
  bool need_dn, need_db;
  at::Tensor grad_out, lin_max, norm, winner;
  at::Tensor grad_lin, grad_norm, grad_b;

  std::tuple<at::Tensor, at::Tensor, at::Tensor> outputs() const { return {grad_lin, grad_norm, grad_b}; }
};

template <typename Shapes>
ScaleBackwardTensors scale_backward_tensors(const at::Tensor& grad_out, const at::Tensor& lin_max,
                                            const at::Tensor& norm, const at::Tensor& winner, const Shapes& s,
                                            int mode, bool detach, bool need_grad_norm, bool need_grad_b) {
  ScaleBackwardTensors t;
  t.need_dn = need_grad_norm && !detach && mode != bcos_math::kModeOne;
  t.need_db = need_grad_b && mode == bcos_math::kModeGeneral;
  t.grad_out = grad_out.contiguous();
  t.lin_max = lin_max.contiguous();
  t.norm = mode == bcos_math::kModeOne ? norm : norm.contiguous();
  t.winner = s.M > 1 ? winner.contiguous() : winner;
  const auto opts = t.grad_out.options();
  const auto b_opts = opts.dtype(acc_dtype(t.grad_out.scalar_type()));
  t.grad_lin = at::empty({s.N, s.O * s.M, s.P}, opts);
  t.grad_norm = t.need_dn ? at::empty({s.N, s.G, s.P}, opts) : at::empty({0}, opts);
  t.grad_b = t.need_db ? at::empty({}, b_opts) : at::empty({0}, b_opts);
  if (t.grad_lin.numel() == 0) {
    t.grad_norm.zero_();
    t.grad_b.zero_();
  }
  return t;
}

// NHWC memory (channels_last but not NCHW-contiguous): both backends then walk
// channels fastest; anything else is processed as NCHW.
inline bool use_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// ---------------------------------------------------------------------------
// LWTA (lwta_block_forward / lwta_block_backward): x viewed as (outer, C,
// inner), C = dim 1 of a 4-D x, the last dim otherwise.
// ---------------------------------------------------------------------------
struct LwtaShape {
  int64_t outer, C, inner;
};

inline int64_t lwta_channel_dim(const at::Tensor& x) { return x.dim() == 4 ? 1 : x.dim() - 1; }

inline LwtaShape check_lwta_args(const at::Tensor& x, int64_t competitors, double temperature, bool deterministic) {
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 4, "x must have 2, 3 or 4 dimensions, got shape ", x.sizes());
  TORCH_CHECK(competitors >= 1 && competitors <= 256, "competitors must be in [1, 256], got ", competitors);
  TORCH_CHECK(deterministic || temperature > 0.0, "temperature must be > 0, got ", temperature);
  const int64_t dim = lwta_channel_dim(x);
  LwtaShape s{1, x.size(dim), 1};
  TORCH_CHECK(s.C % competitors == 0, "competitors=", competitors, " must divide the channel dim of x (dim ", dim,
              ", size ", s.C, ")");
  for (int64_t i = 0; i < dim; ++i) s.outer *= x.size(i);
  for (int64_t i = dim + 1; i < x.dim(); ++i) s.inner *= x.size(i);
  return s;
}

// x's shape with the channel dim divided by competitors (one uint8 per block).
inline std::vector<int64_t> lwta_winner_shape(const at::Tensor& x, int64_t competitors) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[lwta_channel_dim(x)] /= competitors;
  return shape;
}

// The noise to read (contiguous, x's shape, float32 or x's dtype) or an
// undefined tensor (the kernels draw it).
template <typename Device>
at::Tensor lwta_noise(const std::optional<at::Tensor>& noise, const at::Tensor& x, bool deterministic) {
  if (deterministic || !noise.has_value() || !noise->defined()) return at::Tensor();
  Device::check_with(*noise, "noise", x, "x");
  TORCH_CHECK(noise->sizes() == x.sizes(), "noise must have the shape of x ", x.sizes(), ", got ", noise->sizes());
  TORCH_CHECK(noise->scalar_type() == at::kFloat || noise->scalar_type() == x.scalar_type(),
              "noise must have dtype float32 or x's dtype ", x.scalar_type(), ", got ", noise->scalar_type());
  return noise->contiguous();
}

// grad_out (x's shape and dtype) and winner (uint8, lwta_winner_shape) of the backward.
template <typename Device>
void check_lwta_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& winner,
                              int64_t competitors) {
  Device::check_with(grad_out, "grad_out", x, "x");
  Device::check_with(winner, "winner", x, "x");
  check_same_dtype(grad_out, "grad_out", x, "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have the shape of x ", x.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(winner.scalar_type() == at::kByte, "winner must be uint8, got ", winner.scalar_type());
  TORCH_CHECK(winner.sizes() == at::IntArrayRef(lwta_winner_shape(x, competitors)), "winner must have shape ",
              lwta_winner_shape(x, competitors), ", got ", winner.sizes());
}

// ---------------------------------------------------------------------------
// Class-specific gate (csg_gate_forward / csg_gate_backward): x (N, C) or
// (N, C, H, W), walked as NCHW or, for NHWC memory, channels fastest.
// ---------------------------------------------------------------------------
struct CsgShape {
  int64_t N, C, HW, K;
  bool channels_last;
  at::MemoryFormat format;  // the layout the kernels read and write
};

inline CsgShape csg_shape(const at::Tensor& x, int64_t num_classes) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 4, "x must have shape (N, C) or (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(num_classes >= 1, "the mask must have at least one class column, got ", num_classes);
  const bool cl = x.dim() == 4 && use_channels_last(x);
  return CsgShape{x.size(0), x.size(1), x.dim() == 4 ? x.size(2) * x.size(3) : 1, num_classes, cl,
                  cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous};
}

template <typename Device>
void check_csg_labels(const at::Tensor& labels, const at::Tensor& x) {
  Device::check_with(labels, "labels", x, "x");
  TORCH_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "labels must have shape (", x.size(0), "), got ",
              labels.sizes());
}

template <typename Device>
void check_csg_mask(const at::Tensor& mask, const at::Tensor& x) {
  Device::check_with(mask, "mask", x, "x");
  check_same_dtype(mask, "mask", x, "x");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == x.size(1), "mask must have shape (", x.size(1),
              ", num_classes), got ", mask.sizes());
}

// The forward's inputs in the kernels' layout and its output.
struct CsgForwardTensors {
  CsgShape shape;
  at::Tensor x, mask, labels, out;
};

template <typename Device>
CsgForwardTensors csg_forward_tensors(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& labels) {
  Device::check(x, "x");
  check_float_dtype(x, "x");
  check_csg_mask<Device>(mask, x);
  check_csg_labels<Device>(labels, x);
  CsgForwardTensors t;
  t.shape = csg_shape(x, mask.size(1));
  t.x = x.contiguous(t.shape.format);
  t.mask = mask.contiguous();
  t.labels = labels.contiguous();
  t.out = at::empty(t.x.sizes(), t.x.options().memory_format(t.shape.format));
  return t;
}

// The backward's inputs in the kernels' layout (x and mask undefined where not needed) and its outputs
// (grad_x in that layout, grad_mask (C, K); (0,) when not needed).
struct CsgBackwardTensors {
  CsgShape shape;
  at::Tensor grad_out, x, mask, labels, grad_x, grad_mask;
};

template <typename Device>
CsgBackwardTensors csg_backward_tensors(const at::Tensor& grad_out, const std::optional<at::Tensor>& x,
                                        const std::optional<at::Tensor>& mask, const at::Tensor& labels,
                                        int64_t num_classes, bool need_x, bool need_mask) {
  Device::check(grad_out, "grad_out");
  check_float_dtype(grad_out, "grad_out");
  check_csg_labels<Device>(labels, grad_out);
  CsgBackwardTensors t;
  t.shape = csg_shape(grad_out, num_classes);
  t.grad_out = grad_out.contiguous(t.shape.format);
  if (need_x) {
    TORCH_CHECK(mask.has_value() && mask->defined(), "need_x=True requires mask");
    check_csg_mask<Device>(*mask, grad_out);
    TORCH_CHECK(mask->size(1) == num_classes, "mask has ", mask->size(1), " class columns but num_classes=",
                num_classes);
    t.mask = mask->contiguous();
  }
  if (need_mask) {
    TORCH_CHECK(x.has_value() && x->defined(), "need_mask=True requires x");
    Device::check_with(*x, "x", grad_out, "grad_out");
    check_same_dtype(*x, "x", grad_out, "grad_out");
    TORCH_CHECK(x->sizes() == grad_out.sizes(), "x must have the shape of grad_out ", grad_out.sizes(), ", got ",
                x->sizes());
    t.x = x->contiguous(t.shape.format);  // the layout grad_out is read in
  }
  t.labels = labels.contiguous();
  const auto opts = t.grad_out.options();
  t.grad_x = need_x ? at::empty(t.grad_out.sizes(), opts.memory_format(t.shape.format)) : at::empty({0}, opts);
  t.grad_mask = need_mask ? at::empty({t.shape.C, t.shape.K}, opts) : at::empty({0}, opts);
  return t;
}

// The device checks of the CPU ops (csrc/cpu): every tensor on the CPU.
struct CpuDevice {
  static void check(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  }
  static void check_with(const at::Tensor& t, const char* name, const at::Tensor&, const char*) { check(t, name); }
};

}  // namespace bcos_checks
