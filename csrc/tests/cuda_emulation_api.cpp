// C entry points to the CUDA launchers (csrc/cuda/kernels.h) for the host
// emulation build (csrc/tests/cuda_host_emulation.h), so that a Python test
// can call them through ctypes on CPU tensors.  Arguments are flat: arrays
// of int64 for the structs, 0/1 ints for bools; each returns the cudaError_t.
#include <cstring>

#include "cuda/kernels.h"

namespace kc = bcos_kernels::cuda;

// The two CUDA runtime functions the launchers call outside kernels.
extern "C" {
cudaError_t CUDARTAPI cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t /*stream*/) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
}

namespace {

kc::DType dtype(int code) { return static_cast<kc::DType>(code); }

// geometry: N, C, H, W, G, Cg, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw
kc::PatchGeometry geometry(const int64_t* v) {
  return kc::PatchGeometry{v[0], v[1], v[2],  v[3],  v[4],  v[5],  v[6],  v[7],
                           v[8], v[9], v[10], v[11], v[12], v[13], v[14], v[15]};
}

kc::Strides4 strides(const int64_t* v) { return kc::Strides4{v[0], v[1], v[2], v[3]}; }

// problem: N, O, M, P, G
kc::ScaleProblem scale_problem(const int64_t* v, int mode, double b, double scale) {
  return kc::ScaleProblem{v[0], v[1], v[2], v[3], v[4], mode, b, scale};
}

kc::DauProblem dau_problem(int64_t P, int64_t O, int r, int R, int norm) { return kc::DauProblem{P, O, r, R, norm}; }

kc::Matrix matrix(const void* data, const int64_t* strides2) { return kc::Matrix{data, strides2[0], strides2[1]}; }

// outer, C, inner
kc::LwtaProblem lwta_problem(const int64_t* v, int U, double temperature, int deterministic, uint64_t seed,
                             uint64_t offset) {
  return kc::LwtaProblem{v[0], v[1], v[2], U, temperature, deterministic != 0, seed, offset};
}

// N, C, HW, K
kc::CsgProblem csg_problem(const int64_t* v, int channels_last) {
  return kc::CsgProblem{v[0], v[1], v[2], v[3], channels_last != 0};
}

}  // namespace

extern "C" {

int emu_patch_norm(int dt, const void* x, const int64_t* xs, int cl, const int64_t* geom, void* sq, void* norm) {
  return kc::patch_norm(dtype(dt), x, strides(xs), cl != 0, geometry(geom), sq, norm, nullptr);
}

int emu_patch_norm_backward(int dt, const void* grad_norm, const void* norm, const void* x, const int64_t* xs,
                            void* grad_x, const int64_t* gs, int cl, const int64_t* geom, void* r) {
  return kc::patch_norm_backward(dtype(dt), grad_norm, norm, x, strides(xs), grad_x, strides(gs), cl != 0,
                                 geometry(geom), r, nullptr);
}

// channel_scale: the optional per-output-channel factor of the forward (null: none).
int emu_bcos_scale_forward(int dt, const void* lin, const void* norm, void* out, void* lin_max, uint8_t* winner,
                           const void* channel_scale, const int64_t* prob, int mode, double b, double scale) {
  return kc::bcos_scale_forward(dtype(dt), lin, norm, out, lin_max, winner, channel_scale,
                                scale_problem(prob, mode, b, scale), nullptr);
}

int emu_bcos_conv_scale_forward(int dt, const void* lin, const void* x, const int64_t* xs, int cl,
                                const int64_t* geom, void* sq, void* norm, void* out, void* lin_max, uint8_t* winner,
                                const void* channel_scale, const int64_t* prob, int mode, double b, double scale) {
  return kc::bcos_conv_scale_forward(dtype(dt), lin, x, strides(xs), cl != 0, geometry(geom), sq, norm, out, lin_max,
                                     winner, channel_scale, scale_problem(prob, mode, b, scale), nullptr);
}

int64_t emu_bcos_scale_backward_partials(const int64_t* prob, int mode, double b, double scale) {
  return kc::bcos_scale_backward_partials(scale_problem(prob, mode, b, scale));
}

int emu_bcos_scale_backward(int dt, const void* grad_out, const void* lin_max, const void* norm, const uint8_t* winner,
                            void* grad_lin, void* grad_norm, void* grad_b, double* partials, const int64_t* prob,
                            int mode, double b, double scale, int detach) {
  return kc::bcos_scale_backward(dtype(dt), grad_out, lin_max, norm, winner, grad_lin, grad_norm, grad_b, partials,
                                 scale_problem(prob, mode, b, scale), detach != 0, nullptr);
}

int emu_dau_forward(int dt, const void* y, const int64_t* ys, const void* z, const int64_t* zs, const void* gram,
                    int64_t P, int64_t O, int r, int R, int norm, void* out, void* s) {
  return kc::dau_forward(dtype(dt), matrix(y, ys), matrix(z, zs), gram, dau_problem(P, O, r, R, norm), out, s,
                         nullptr);
}

int64_t emu_dau_backward_workspace_elems(int64_t P, int64_t O, int r, int R, int norm, int need_m) {
  return kc::dau_backward_workspace_elems(dau_problem(P, O, r, R, norm), need_m != 0);
}

int emu_dau_backward(int dt, const void* grad_out, const int64_t* gs, const void* y, const int64_t* ys, const void* z,
                     const int64_t* zs, const void* s, const int64_t* ss, const void* gram, int64_t P, int64_t O, int r,
                     int R, int norm, int detach, void* dz, void* dy, void* m, void* workspace) {
  return kc::dau_backward(dtype(dt), matrix(grad_out, gs), matrix(y, ys), matrix(z, zs), matrix(s, ss), gram,
                          dau_problem(P, O, r, R, norm), detach != 0, dz, dy, m, workspace, nullptr);
}

int emu_lwta_forward(int dt, const void* x, const void* noise, int noise_dt, const int64_t* shape, int U,
                     double temperature, int deterministic, uint64_t seed, uint64_t offset, void* out,
                     uint8_t* winner) {
  return kc::lwta_forward(dtype(dt), x, noise, dtype(noise_dt),
                          lwta_problem(shape, U, temperature, deterministic, seed, offset), out, winner, nullptr);
}

int emu_lwta_backward(int dt, const void* grad_out, const void* x, const uint8_t* winner, const void* noise,
                      int noise_dt, const int64_t* shape, int U, double temperature, int deterministic, uint64_t seed,
                      uint64_t offset, void* grad_x) {
  return kc::lwta_backward(dtype(dt), grad_out, x, winner, noise, dtype(noise_dt),
                           lwta_problem(shape, U, temperature, deterministic, seed, offset), grad_x, nullptr);
}

int emu_lwta_uniform(float* u, int64_t numel, uint64_t seed, uint64_t offset) {
  return kc::lwta_uniform(u, numel, seed, offset, nullptr);
}

int emu_csg_forward(int dt, const void* x, const void* mask, const int64_t* labels, const int64_t* prob, int cl,
                    void* out) {
  return kc::csg_forward(dtype(dt), x, mask, labels, csg_problem(prob, cl), out, nullptr);
}

int emu_csg_backward(int dt, const void* grad_out, const void* x, const void* mask, const int64_t* labels,
                     const int64_t* prob, int cl, void* grad_x, void* grad_mask, void* per_sample) {
  return kc::csg_backward(dtype(dt), grad_out, x, mask, labels, csg_problem(prob, cl), grad_x, grad_mask, per_sample,
                          nullptr);
}

}  // extern "C"
