// The problem descriptions the CUDA launchers (csrc/cuda/kernels.h) take:
// plain structs without CUDA types, so that host code and the plain C++ tests
// (csrc/tests/test_launch_geometry.cpp) can use them without the toolkit.
#ifndef BCOS_KERNELS_CUDA_PROBLEMS_H_
#define BCOS_KERNELS_CUDA_PROBLEMS_H_

#include <cstdint>

namespace bcos_kernels {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Geometry of a convolution's patches on x (N, C, H, W), groups G.
struct PatchGeometry {
  int64_t N, C, H, W, G, Cg, Ho, Wo;
  int64_t kh, kw, sh, sw, ph, pw, dh, dw;
};

// Element strides of a 4-D tensor (N, C, H, W).
struct Strides4 {
  int64_t n, c, h, w;
};

// Shapes of the dynamic scale: lin (N, O * M, P) contiguous (channel o * M + m
// is MaxOut unit m of output o), norm (N, G, P) contiguous with G dividing O
// (output o uses norm group o / (O / G)).  mode: bcos_math::ScaleMode.
struct ScaleProblem {
  int64_t N, O, M, P, G;
  int mode;
  double b;      // b (not b - 1)
  double scale;  // output divisor (1 for v2)
};

struct Matrix {
  const void* data;
  int64_t row_stride, col_stride;
};

struct DauProblem {
  int64_t P;  // pixels
  int64_t O;  // DAUs
  int r;      // rank (columns of z)
  int R;      // r + 1 with a bias (za gets a constant 1 appended), else r
  int norm;   // bcos_math::DauNorm
};

// Largest R the kernels accept (their shared-memory tiles scale with R).
constexpr int kDauMaxRank = 512;

struct LwtaProblem {
  int64_t outer, C, inner;
  int U;
  double temperature;
  bool deterministic;
  uint64_t seed, offset;
};

struct CsgProblem {
  int64_t N, C, HW, K;
  bool channels_last;
};

}  // namespace cuda
}  // namespace bcos_kernels

#endif  // BCOS_KERNELS_CUDA_PROBLEMS_H_
