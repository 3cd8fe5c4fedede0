// Schemas of the ops implemented by the CUDA glue (csrc/cuda/ops_cuda.cpp); the LWTA and gate ops have a CPU
// implementation too (csrc/cpu/lwta_cpu.cpp, csrc/cpu/csg_cpu.cpp), the others only a CUDA one.
//
// Declared here, in a file every build compiles (CPU-only ones included), so
// that the ops exist everywhere: Python can then register their fake impls
// (bcos_kernels/ops/_cpu_fake.py) and torch.compile can trace calls to them
// on any machine.  Calling a CUDA-only one on a CPU tensor raises torch's
// "no kernel for CPU" error.  ops.cpp owns TORCH_LIBRARY(bcos_kernels); this is a fragment.
//
// Argument conventions (kernels: csrc/cuda/kernels.h; math: csrc/common/*.h).
// "acc" is float32, or float64 for float64 inputs.  No op has autograd: the
// Python front doors wrap them.
//
// bcos_conv_scale_forward: patch_norm(x, ...) followed by bcos_scale_forward(lin,
//   norm.flatten(2), ...), with the norms computed inside the scale pass;
//   returns bcos_scale_forward's (out, lin_max, winner) and norm (N, G, Ho, Wo),
//   the latter (0,) when b == 1 (no norm needed).  lin: (N, O * max_out, Ho * Wo).
//   channel_scale: None or (O,) in lin's dtype and device, multiplies out[:, o]
//   in the same pass (as bcos_scale_forward's); lin_max, winner and norm are unscaled.
//
// dau_combine_forward(y, z, gram, norm): the DAU epilogue (DESIGN.md section 3).
//   z (P, r) and y (P, O * R) pixel-major, any strides (e.g. the two column
//   ranges of one conv output), same float dtype; R = r, or r + 1 when the
//   layer has a bias (za = [z, 1]); column o * R + q of y is response q of DAU
//   o; gram (O, R, R) acc, G_o = [E_o | b_o]^T [E_o | b_o] (symmetric).
//   norm: "squash" or "l2".  Returns out (P, O) (y's dtype) = (za . y_o) *
//   inv_f(s), and s = ||w_o|| = sqrt(max(za^T G_o za, 0)) (P, O) acc; out = 0
//   where s == 0.
// dau_combine_backward(grad_out (P, O), y, z, s (as returned), gram, norm,
//   detach, need_dz, need_dy, need_m) -> (dz (P, r), dy (P, O * R), m (O, R, R) acc):
//   dnum = g inv_f(s), dq = g out ratio(s) (0 when detach),
//   dz = (sum_o dnum_o y_o + 2 dq_o G_o za)[:r], dy = dnum_o za,
//   m_o = sum over pixels of dq_o za za^T; each (0,) when not needed; detach
//   requires need_dz = need_m = False.
//
// lwta_block_forward(x, competitors, temperature, deterministic, noise, seed,
//   offset) -> (out, winner): LWTA over blocks of `competitors` consecutive
//   channels (dim 1 of a 4-D x, the last dim of a 2-D/3-D x).  deterministic:
//   argmax of x.  Else Gumbel softmax at `temperature` of x + gumbel(u), u =
//   `noise` (x's shape, float32 or x's dtype) or, when noise is None, drawn in
//   the kernel from (seed, offset) (see lwta_uniform).  out contiguous in x's
//   dtype, winner uint8 (x's shape with the channel dim divided by competitors).
// lwta_block_backward(grad_out, x, winner, <same arguments>) -> grad_x: the
//   straight-through gradient; the uniforms are re-drawn from (seed, offset)
//   (pass the forward's) or read from noise.
// lwta_uniform(x, seed, offset) -> u: the float32 uniforms in [0, 1) the
//   kernels draw for x's shape: element i (row-major) gets word i % 4 of
//   Philox4x32-10(counter = (i / 4, offset), key = seed), top 24 bits.
//
// csg_gate_forward(x (N, C) or (N, C, H, W), mask (C, K), labels int64 (N,))
//   -> x * mask[c, labels[n]] (x's dtype; channels_last kept); also the
//   gradient w.r.t. x when called with grad_out in place of x.
// csg_gate_backward(grad_out, x, mask, labels, num_classes, need_x, need_mask)
//   -> (grad_x, grad_mask (C, K)): grad_mask[c, k] = sum over samples of class
//   k of sum_hw grad_out * x, a deterministic segmented sum; (0,) when not needed.
#include <torch/library.h>

#include <vector>

TORCH_LIBRARY_FRAGMENT(bcos_kernels, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "bcos_conv_scale_forward(Tensor lin, Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, float b, bool b_is_tensor, int max_out, float scale, "
      "Tensor? channel_scale=None) -> (Tensor out, Tensor lin_max, Tensor winner, Tensor norm)",
      tags);
  m.def("dau_combine_forward(Tensor y, Tensor z, Tensor gram, str norm) -> (Tensor out, Tensor s)", tags);
  m.def(
      "dau_combine_backward(Tensor grad_out, Tensor y, Tensor z, Tensor s, Tensor gram, str norm, bool detach, "
      "bool need_dz, bool need_dy, bool need_m) -> (Tensor dz, Tensor dy, Tensor m)",
      tags);
  m.def(
      "lwta_block_forward(Tensor x, int competitors, float temperature, bool deterministic, Tensor? noise, "
      "int seed, int offset) -> (Tensor out, Tensor winner)",
      tags);
  m.def(
      "lwta_block_backward(Tensor grad_out, Tensor x, Tensor winner, int competitors, float temperature, "
      "bool deterministic, Tensor? noise, int seed, int offset) -> Tensor",
      tags);
  m.def("lwta_uniform(Tensor x, int seed, int offset) -> Tensor", tags);
  m.def("csg_gate_forward(Tensor x, Tensor mask, Tensor labels) -> Tensor", tags);
  m.def(
      "csg_gate_backward(Tensor grad_out, Tensor? x, Tensor? mask, Tensor labels, int num_classes, bool need_x, "
      "bool need_mask) -> (Tensor grad_x, Tensor grad_mask)",
      tags);
}
