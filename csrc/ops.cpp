// Schemas of the bcos_kernels ops and their CPU registrations.
//
// Loading the shared library runs the static registrations below, which
// makes the ops available as torch.ops.bcos_kernels.*.  Built by setup.py as
// the Python module bcos_kernels._C (BCOS_PYTHON_MODULE defined: a minimal
// PyInit__C so that `import bcos_kernels._C` loads it); built by CMake as a
// plain shared library for torch.ops.load_library.
//
// The ops have no autograd kernels: the Python front door
// (bcos_kernels.ops) wraps them in autograd and supplies fake impls.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace bcos_kernels {
namespace cpu {

at::Tensor patch_norm(const at::Tensor& x, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

at::Tensor patch_norm_backward(const at::Tensor& grad_norm, const at::Tensor& x, const at::Tensor& norm,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t groups);

// grad_x += the gradient through the patch norm (grad_x: x's shape, in the layout x is read in).
void patch_norm_backward_add_(at::Tensor& grad_x, const at::Tensor& grad_norm, const at::Tensor& x,
                              const at::Tensor& norm, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

std::tuple<at::Tensor, at::Tensor> weight_normalize(const at::Tensor& weight);

at::Tensor weight_normalize_backward(const at::Tensor& grad_w_hat, const at::Tensor& w_hat, const at::Tensor& norm);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bcos_scale_forward(const at::Tensor& lin, const at::Tensor& norm,
                                                                  double b, bool b_is_tensor, int64_t max_out,
                                                                  double scale,
                                                                  const std::optional<at::Tensor>& channel_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> bcos_scale_backward(const at::Tensor& grad_out,
                                                                   const at::Tensor& lin_max, const at::Tensor& norm,
                                                                   const at::Tensor& winner, double b,
                                                                   bool b_is_tensor, int64_t max_out, double scale,
                                                                   bool detach, bool need_grad_norm,
                                                                   bool need_grad_b);

// LWTA (csrc/cpu/lwta_cpu.cpp; schemas: csrc/cuda_schemas.cpp).
std::tuple<at::Tensor, at::Tensor> lwta_block_forward(const at::Tensor& x, int64_t competitors, double temperature,
                                                      bool deterministic, const std::optional<at::Tensor>& noise,
                                                      int64_t seed, int64_t offset);

at::Tensor lwta_block_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& winner,
                               int64_t competitors, double temperature, bool deterministic,
                               const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset);

at::Tensor lwta_uniform(const at::Tensor& x, int64_t seed, int64_t offset);
std::tuple<at::Tensor, at::Tensor> lwta_sample_forward(const at::Tensor& x, int64_t competitors, double temperature,
                                                       const std::optional<at::Tensor>& noise, int64_t seed,
                                                       int64_t offset);
at::Tensor lwta_sample_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& probs,
                                int64_t competitors, double temperature);

// Class-specific gate (csrc/cpu/csg_cpu.cpp; schemas: csrc/cuda_schemas.cpp).
at::Tensor csg_gate_forward(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& labels);

std::tuple<at::Tensor, at::Tensor> csg_gate_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& x,
                                                     const std::optional<at::Tensor>& mask, const at::Tensor& labels,
                                                     int64_t num_classes, bool need_x, bool need_mask);

}  // namespace cpu
}  // namespace bcos_kernels

TORCH_LIBRARY(bcos_kernels, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "patch_norm(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) "
      "-> Tensor",
      tags);
  m.def(
      "patch_norm_backward(Tensor grad_norm, Tensor x, Tensor norm, int[2] kernel_size, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups) -> Tensor",
      tags);
  m.def(
      "patch_norm_backward_add_(Tensor(a!) grad_x, Tensor grad_norm, Tensor x, Tensor norm, int[2] kernel_size, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups) -> ()",
      tags);
  // Per-filter weight normalisation w / ||w|| (norm: (O, 1, ...)) and its backward.
  m.def("weight_normalize(Tensor weight) -> (Tensor w_hat, Tensor norm)", tags);
  m.def("weight_normalize_backward(Tensor grad_w_hat, Tensor w_hat, Tensor norm) -> Tensor", tags);
  // channel_scale: None, or (O,) (O = lin.shape[1] / max_out) in lin's dtype and device: out[:, o] is
  // multiplied by it in the same pass (an eval-mode batch norm folded into the layer); lin_max and winner are
  // not (the backward reads them unscaled).
  m.def(
      "bcos_scale_forward(Tensor lin, Tensor norm, float b, bool b_is_tensor, int max_out, float scale, "
      "Tensor? channel_scale=None) -> (Tensor out, Tensor lin_max, Tensor winner)",
      tags);
  m.def(
      "bcos_scale_backward(Tensor grad_out, Tensor lin_max, Tensor norm, Tensor winner, float b, "
      "bool b_is_tensor, int max_out, float scale, bool detach, bool need_grad_norm, bool need_grad_b) "
      "-> (Tensor grad_lin, Tensor grad_norm, Tensor grad_b)",
      tags);
  // The stochastic LWTA keeping the softmax probabilities (CPU only; fp32/fp64 x, probs in its dtype, both
  // contiguous): the forward of lwta_block_forward with the probabilities instead of the winner; the backward
  // reads them (and finds the winner again from them) instead of drawing the noise again.
  m.def(
      "lwta_sample_forward(Tensor x, int competitors, float temperature, Tensor? noise, int seed, int offset) "
      "-> (Tensor out, Tensor probs)",
      tags);
  m.def(
      "lwta_sample_backward(Tensor grad_out, Tensor x, Tensor probs, int competitors, float temperature) -> Tensor",
      tags);
}

TORCH_LIBRARY_IMPL(bcos_kernels, CPU, m) {
  m.impl("patch_norm", &bcos_kernels::cpu::patch_norm);
  m.impl("patch_norm_backward", &bcos_kernels::cpu::patch_norm_backward);
  m.impl("patch_norm_backward_add_", &bcos_kernels::cpu::patch_norm_backward_add_);
  m.impl("weight_normalize", &bcos_kernels::cpu::weight_normalize);
  m.impl("weight_normalize_backward", &bcos_kernels::cpu::weight_normalize_backward);
  m.impl("bcos_scale_forward", &bcos_kernels::cpu::bcos_scale_forward);
  m.impl("bcos_scale_backward", &bcos_kernels::cpu::bcos_scale_backward);
  m.impl("lwta_block_forward", &bcos_kernels::cpu::lwta_block_forward);
  m.impl("lwta_block_backward", &bcos_kernels::cpu::lwta_block_backward);
  m.impl("lwta_uniform", &bcos_kernels::cpu::lwta_uniform);
  m.impl("lwta_sample_forward", &bcos_kernels::cpu::lwta_sample_forward);
  m.impl("lwta_sample_backward", &bcos_kernels::cpu::lwta_sample_backward);
  m.impl("csg_gate_forward", &bcos_kernels::cpu::csg_gate_forward);
  m.impl("csg_gate_backward", &bcos_kernels::cpu::csg_gate_backward);
}

#if defined(BCOS_PYTHON_MODULE)
#include <Python.h>

// A module with no functions: importing it only loads this library (and so
// runs the registrations above).  WITH_CUDA tells Python whether CUDA
// kernels were compiled in.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                           // m_name
      "Compiled kernels of bcos_kernels (registers torch.ops.bcos_kernels.*)",  // m_doc
      -1,                                                             // m_size
      nullptr,                                                        // m_methods
      nullptr,                                                        // m_slots
      nullptr,                                                        // m_traverse
      nullptr,                                                        // m_clear
      nullptr,                                                        // m_free
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#if defined(BCOS_WITH_CUDA)
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
  Py_INCREF(with_cuda);
  if (PyModule_AddObject(module, "WITH_CUDA", with_cuda) < 0) {
    Py_DECREF(with_cuda);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
#endif
