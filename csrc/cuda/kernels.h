// Launchers of the CUDA kernels of bcos_kernels: plain C++ declarations that
// take raw pointers, sizes, strides and a stream, so that the kernels
// (csrc/cuda/*.cu) build without torch headers (`nvcc -c` in CI) and the
// torch glue (csrc/cuda/ops_cuda.cpp) stays a thin layer of checks and
// allocations.
//
// Conventions
//  - Sizes, strides and offsets are int64 (in elements).
//  - DType is the storage type of the float tensors of a call; arithmetic
//    runs in the accumulation type: float for float32/bfloat16/float16,
//    double for float64 ("acc" below).
//  - Workspaces are allocated by the caller (torch's caching allocator);
//    their sizes are given by the *_elems helpers, in elements of the type
//    stated there.
//  - Every reduction has a fixed order that depends only on the shapes (grid
//    sizes never depend on the device), so results are deterministic and the
//    same on every GPU.
//  - Each launcher returns the launch status (cudaGetLastError()).
#ifndef BCOS_KERNELS_CUDA_KERNELS_H_
#define BCOS_KERNELS_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/problems.h"

namespace bcos_kernels {
namespace cuda {

// ---------------------------------------------------------------------------
// B-cos (semantics: csrc/common/bcos_math.h and the CPU kernels).
// ---------------------------------------------------------------------------

// norm (N, G, Ho, Wo) contiguous = sqrt(sum over the patch and the group's
// channels of x^2 + 1e-6).  x: any strides; x_channels_last says which
// iteration order reads it best (true for NHWC memory).
// sq_workspace: N * G * H * W acc elements.
cudaError_t patch_norm(DType dtype, const void* x, Strides4 x_strides, bool x_channels_last, const PatchGeometry& g,
                       void* sq_workspace, void* norm, cudaStream_t stream);

// grad_x (x's shape, strides grad_x_strides) = x * (sum over the patches
// containing each element of grad_norm / norm).  grad_norm, norm: (N, G, Ho,
// Wo) contiguous.  channels_last: iteration order (true for NHWC memory).
// r_workspace: N * G * H * W acc elements.
cudaError_t patch_norm_backward(DType dtype, const void* grad_norm, const void* norm, const void* x,
                                Strides4 x_strides, void* grad_x, Strides4 grad_x_strides, bool channels_last,
                                const PatchGeometry& g, void* r_workspace, cudaStream_t stream);

// out (N, O, P) = dynamic scale of the MaxOut of lin; with M > 1 also lin_max
// (N, O, P) and winner (uint8, the first maximal unit).  norm is unused
// (may be null) in mode one.  All outputs contiguous.
// channel_scale: null, or (O,) contiguous in dtype: out[n, o, p] is then
// multiplied by channel_scale[o] in acc before the store
// (bcos_math::apply_channel_scale); lin_max and winner are not.
cudaError_t bcos_scale_forward(DType dtype, const void* lin, const void* norm, void* out, void* lin_max,
                               uint8_t* winner, const void* channel_scale, const ScaleProblem& s,
                               cudaStream_t stream);

// patch_norm + bcos_scale_forward in two kernels instead of three: the
// norms are computed from the channel sums of squares inside the scale pass
// (and written to `norm`, (N, G, Ho, Wo) contiguous, for the backward).
// s.P must be g.Ho * g.Wo and s.G must be g.G; not for mode one (no norm).
// sq_workspace: N * G * H * W acc elements.  channel_scale: as in
// bcos_scale_forward (the norms are never scaled).
cudaError_t bcos_conv_scale_forward(DType dtype, const void* lin, const void* x, Strides4 x_strides,
                                    bool x_channels_last, const PatchGeometry& g, void* sq_workspace, void* norm,
                                    void* out, void* lin_max, uint8_t* winner, const void* channel_scale,
                                    const ScaleProblem& s, cudaStream_t stream);

// Number of double partial sums bcos_scale_backward needs for grad_b.
int64_t bcos_scale_backward_partials(const ScaleProblem& s);

// grad_lin (N, O * M, P): d out / d lin routed to the MaxOut winner (0 at the
// other units); grad_norm (N, G, P) when non-null (not in mode one or
// detach); grad_b (one acc element) when non-null (general mode only), summed
// through db_partials (bcos_scale_backward_partials doubles).  grad_out,
// lin_max (N, O, P) and winner (uint8, only read when M > 1) contiguous.
cudaError_t bcos_scale_backward(DType dtype, const void* grad_out, const void* lin_max, const void* norm,
                                const uint8_t* winner, void* grad_lin, void* grad_norm, void* grad_b,
                                double* db_partials, const ScaleProblem& s, bool detach, cudaStream_t stream);

// ---------------------------------------------------------------------------
// DAU epilogue (semantics: csrc/common/dau_math.h).  Pixel-major 2-D tensors
// (rows = pixels), each with its own row and column strides.
// ---------------------------------------------------------------------------

// y: (P, O * R), column o * R + q = response q of DAU o;  z: (P, r);
// gram: (O, R, R) contiguous acc.  Writes out (P, O) contiguous (dtype) and
// s = ||w|| (P, O) contiguous acc.
cudaError_t dau_forward(DType dtype, Matrix y, Matrix z, const void* gram, const DauProblem& d, void* out, void* s,
                        cudaStream_t stream);

// Workspace of dau_backward, in acc elements.
int64_t dau_backward_workspace_elems(const DauProblem& d, bool need_m);

// grad_out, y, z: dtype; s (P, O): acc (as written by dau_forward); gram as
// in dau_forward.  Outputs (null when not wanted), contiguous:
//   dz (P, r) dtype: d loss / d z      (requires !detach)
//   dy (P, O * R) dtype: d loss / d y
//   m  (O, R, R) acc: sum over pixels of dq_o za za^T (requires !detach)
// detach: the norms are constants (dq = 0).
cudaError_t dau_backward(DType dtype, Matrix grad_out, Matrix y, Matrix z, Matrix s, const void* gram,
                         const DauProblem& d, bool detach, void* dz, void* dy, void* m, void* workspace,
                         cudaStream_t stream);

// ---------------------------------------------------------------------------
// LWTA (semantics: csrc/common/lwta_math.h).  x is contiguous and viewed as
// (outer, C, inner); blocks of U consecutive channels along C compete.
// winner: (outer, C / U, inner) uint8.  Noise: u of element i (its row-major
// index in x) is noise[i] when noise is non-null (dtype noise_dtype, float32
// or x's), else bcos_math::lwta_uniform(seed, offset, i).
// ---------------------------------------------------------------------------

cudaError_t lwta_forward(DType dtype, const void* x, const void* noise, DType noise_dtype, const LwtaProblem& p,
                         void* out, uint8_t* winner, cudaStream_t stream);

cudaError_t lwta_backward(DType dtype, const void* grad_out, const void* x, const uint8_t* winner, const void* noise,
                          DType noise_dtype, const LwtaProblem& p, void* grad_x, cudaStream_t stream);

// u (numel float32) = the uniforms the kernels draw for (seed, offset).
cudaError_t lwta_uniform(float* u, int64_t numel, uint64_t seed, uint64_t offset, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Class-specific gate.  x viewed as (N, C, HW) (channels_last == false) or
// (N, HW, C) (channels_last == true), contiguous; mask (C, K) contiguous,
// labels (N,) int64.  A label outside [0, K) gives NaN (never an
// out-of-bounds read); the front door checks the range.
// ---------------------------------------------------------------------------

// out = x * mask[c, labels[n]] (also the gradient w.r.t. x, with x := grad_out).
cudaError_t csg_forward(DType dtype, const void* x, const void* mask, const int64_t* labels, const CsgProblem& p,
                        void* out, cudaStream_t stream);

// grad_x (null: not wanted) = grad_out * mask[c, labels[n]];
// grad_mask (C, K) (null: not wanted) = sum over n with labels[n] == k of
// sum_hw grad_out * x, through per_sample_workspace (N * C acc elements).
cudaError_t csg_backward(DType dtype, const void* grad_out, const void* x, const void* mask, const int64_t* labels,
                         const CsgProblem& p, void* grad_x, void* grad_mask, void* per_sample_workspace,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace bcos_kernels

#endif  // BCOS_KERNELS_CUDA_KERNELS_H_
