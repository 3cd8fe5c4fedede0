// Host-side launch logic of the CUDA kernels: grid sizes, tilings, problem
// validation and workspace sizes.  Plain C++ (compiles with nvcc and g++,
// no CUDA runtime), so ctest checks it without a GPU
// (csrc/tests/test_launch_geometry.cpp).
#ifndef BCOS_KERNELS_CUDA_LAUNCH_GEOMETRY_H_
#define BCOS_KERNELS_CUDA_LAUNCH_GEOMETRY_H_

#include <cstddef>
#include <cstdint>

#include "common/bcos_math.h"  // BCOS_HD, ScaleMode
#include "common/dau_math.h"   // DauNorm
#include "common/lwta_math.h"  // lwta_block_base
#include "cuda/problems.h"

namespace bcos_kernels {
namespace cuda {
namespace detail {

BCOS_HD inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int kThreads = 256;
// Cap on the number of blocks of a launch; kernels loop over the remaining
// work (grid-stride).  A constant, not a function of the device, so that
// the partition of every reduction depends only on the shapes.
constexpr int64_t kMaxBlocks = 16384;

inline unsigned int grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = div_up(work_items, items_per_block);
  return static_cast<unsigned int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

// Bytes of one accumulation-type element.
inline size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// ---------------------------------------------------------------------------
// B-cos dynamic scale: a block of (tp, kThreads / tp) threads works on one
// unit = (n, norm group, tile of tp positions) at a time; tp = 32 when P >= 32.
// ---------------------------------------------------------------------------
struct ScaleGrid {
  unsigned int block_x, block_y, grid;
  int64_t ptiles;  // tiles of block_x positions
  int64_t units;   // N * groups * ptiles
};

inline ScaleGrid scale_grid(const ScaleProblem& s) {
  int tp = 1;
  while (tp < 32 && tp < s.P) tp *= 2;
  ScaleGrid l;
  l.block_x = static_cast<unsigned int>(tp);
  l.block_y = static_cast<unsigned int>(kThreads / tp);
  const int64_t groups = s.mode == bcos_math::kModeOne ? 1 : s.G;
  l.ptiles = div_up(s.P, tp);
  l.units = s.N * groups * l.ptiles;
  l.grid = grid_for(l.units, 1);
  return l;
}

inline bool valid_problem(const ScaleProblem& s) {
  if (s.N < 0 || s.O < 0 || s.P < 0 || s.M < 1 || s.M > 255 || s.G < 1) return false;
  if (s.mode != bcos_math::kModeOne && s.O % s.G != 0) return false;
  return s.scale != 0.0;
}

// ---------------------------------------------------------------------------
// DAU epilogue.
// ---------------------------------------------------------------------------
constexpr int kDauPix = 8;            // pixels per tile of the forward / backward (1)
constexpr int kDauUnitThreads = 128;  // threads over the DAUs of a tile
constexpr int64_t kDauMaxChunks = 64; // pixel chunks of the M reduction
constexpr int64_t kDauMinChunk = 256; // pixels per chunk at least

struct DauChunks {
  int64_t chunks, chunk_len;
};

inline DauChunks dau_chunking(const DauProblem& d) {
  int64_t c = div_up(d.P, kDauMinChunk);
  c = c < 1 ? 1 : (c > kDauMaxChunks ? kDauMaxChunks : c);
  return DauChunks{c, div_up(d.P, c)};
}

// Workspace of dau_backward in acc elements: dnum and dq (P, O), then the
// chunks' partial M (chunks, O, R, R) when M is wanted.
inline int64_t dau_workspace_elems(const DauProblem& d, bool need_m) {
  const DauChunks c = dau_chunking(d);
  return 2 * d.P * d.O + (need_m ? c.chunks * d.O * d.R * d.R : 0);
}

// Pixels per tile of the d za kernel: kThreads / R (at least 1).
inline int dau_za_pixels_per_tile(int R) { return R >= kThreads ? 1 : kThreads / R; }

inline bool valid_problem(const DauProblem& d) {
  if (d.P < 0 || d.O < 0 || d.r < 1 || d.R > kDauMaxRank) return false;
  if (d.R != d.r && d.R != d.r + 1) return false;
  return d.norm == bcos_math::kDauSquash || d.norm == bcos_math::kDauL2;
}

// ---------------------------------------------------------------------------
// LWTA: one thread per competition block of U units; x is (outer, C, inner).
// ---------------------------------------------------------------------------
inline int64_t lwta_blocks(const LwtaProblem& p) { return p.outer * (p.C / p.U) * p.inner; }

using bcos_math::lwta_block_base;  // element index of unit 0 of a block (common/lwta_math.h)

inline bool valid_problem(const LwtaProblem& p) {
  if (p.U < 1 || p.U > 256 || p.outer < 0 || p.C < 0 || p.inner < 0 || p.C % p.U != 0) return false;
  return p.deterministic || p.temperature > 0.0;
}

// ---------------------------------------------------------------------------
// Class-specific gate.
// ---------------------------------------------------------------------------
inline bool valid_problem(const CsgProblem& p) { return p.N >= 0 && p.C >= 0 && p.HW >= 0 && p.K >= 1; }

// Backward (1) walks (N, HW, C) with a thread per (n, c) row; also for HW == 1,
// where both layouts agree.  Otherwise (N, C, HW) with a warp per row.
inline bool csg_backward_by_columns(const CsgProblem& p) { return p.channels_last || p.HW == 1; }

constexpr int kWarp = 32;

// Blocks of the backward (1) launch.
inline unsigned int csg_backward_grid(const CsgProblem& p) {
  return grid_for(p.N * p.C, csg_backward_by_columns(p) ? kThreads : kThreads / kWarp);
}

}  // namespace detail
}  // namespace cuda
}  // namespace bcos_kernels

#endif  // BCOS_KERNELS_CUDA_LAUNCH_GEOMETRY_H_
