// Plain C++ test (no torch, no CUDA) of the CUDA kernels' host-side launch
// logic, csrc/cuda/launch_geometry.h: grid sizes and their cap, the B-cos
// scale tiling and grad_b partial count, DAU chunking and workspace sizes,
// LWTA block indexing, CSG kernel choice, and the problem validation of each
// launcher.  Expected values are worked out by hand in the comments.
// Exit status: 0 when every check passes, 1 otherwise.
#include <cstdint>
#include <cstdio>

#include "cuda/launch_geometry.h"
#include "tests/test_harness.h"

namespace {

namespace kc = bcos_kernels::cuda;
namespace kd = bcos_kernels::cuda::detail;

void check_eq(const char* what, int64_t got, int64_t want) {
  if (!bcos_test::count(got == want)) {
    std::printf("FAIL %-44s got %lld want %lld\n", what, static_cast<long long>(got), static_cast<long long>(want));
  }
}

void check_true(const char* what, bool ok) {
  if (!bcos_test::count(ok)) std::printf("FAIL %s\n", what);
}

void test_grid_for() {
  check_eq("div_up(10, 3)", kd::div_up(10, 3), 4);
  check_eq("div_up(9, 3)", kd::div_up(9, 3), 3);
  check_eq("grid_for(0 items) is one block", kd::grid_for(0, 256), 1);
  check_eq("grid_for(1 item)", kd::grid_for(1, 256), 1);
  check_eq("grid_for(257 items, 256)", kd::grid_for(257, 256), 2);
  check_eq("grid_for(512 items, 256)", kd::grid_for(512, 256), 2);
  // 16384 * 256 items fill the cap exactly; one more item would need 16385 blocks
  check_eq("grid_for at the cap", kd::grid_for(16384LL * 256, 256), 16384);
  check_eq("grid_for past the cap is capped", kd::grid_for(16384LL * 256 + 1, 256), 16384);
  check_eq("grid_for of 2^40 items is capped", kd::grid_for(int64_t{1} << 40, 1), 16384);
  check_eq("acc bytes float16", static_cast<int64_t>(kd::acc_size(kc::DType::kFloat16)), 4);
  check_eq("acc bytes float64", static_cast<int64_t>(kd::acc_size(kc::DType::kFloat64)), 8);
}

kc::ScaleProblem scale(int64_t N, int64_t O, int64_t M, int64_t P, int64_t G, int mode) {
  return kc::ScaleProblem{N, O, M, P, G, mode, mode == bcos_math::kModeTwo ? 2.0 : 2.5, 1.0};
}

void test_scale_grid() {
  // P = 5: tp = 8 (smallest power of two >= 5), 256 / 8 = 32 rows; 1 tile;
  // units = N * G * tiles = 2 * 4 * 1 = 8 blocks
  kd::ScaleGrid l = kd::scale_grid(scale(2, 8, 1, 5, 4, bcos_math::kModeGeneral));
  check_eq("scale P=5 block_x", l.block_x, 8);
  check_eq("scale P=5 block_y", l.block_y, 32);
  check_eq("scale P=5 ptiles", l.ptiles, 1);
  check_eq("scale P=5 units", l.units, 8);
  check_eq("scale P=5 grid", l.grid, 8);
  // P = 100: tp = 32, 8 rows; tiles = ceil(100 / 32) = 4; units = 3 * 2 * 4 = 24
  l = kd::scale_grid(scale(3, 6, 2, 100, 2, bcos_math::kModeTwo));
  check_eq("scale P=100 block_x", l.block_x, 32);
  check_eq("scale P=100 block_y", l.block_y, 8);
  check_eq("scale P=100 ptiles", l.ptiles, 4);
  check_eq("scale P=100 units", l.units, 24);
  // mode one has no norm groups: units = N * 1 * tiles = 3 * 4 = 12
  l = kd::scale_grid(scale(3, 6, 1, 100, 2, bcos_math::kModeOne));
  check_eq("scale mode one ignores G", l.units, 12);
  // P = 1: tp = 1, a block of 1 x 256 threads
  l = kd::scale_grid(scale(1, 4, 1, 1, 1, bcos_math::kModeGeneral));
  check_eq("scale P=1 block_x", l.block_x, 1);
  check_eq("scale P=1 block_y", l.block_y, 256);
  // the grad_b partials are one per block: 1000 * 1 * ceil(10^6 / 32) units, capped at 16384
  l = kd::scale_grid(scale(1000, 4, 1, 1000000, 1, bcos_math::kModeGeneral));
  check_eq("scale units of a large problem", l.units, 1000LL * 31250);
  check_eq("scale grid capped", l.grid, 16384);

  check_true("scale valid", kd::valid_problem(scale(2, 8, 3, 5, 4, bcos_math::kModeGeneral)));
  check_true("scale M = 0 invalid", !kd::valid_problem(scale(2, 8, 0, 5, 4, bcos_math::kModeGeneral)));
  check_true("scale M = 256 invalid", !kd::valid_problem(scale(2, 8, 256, 5, 4, bcos_math::kModeGeneral)));
  check_true("scale G not dividing O invalid", !kd::valid_problem(scale(2, 6, 1, 5, 4, bcos_math::kModeTwo)));
  check_true("scale mode one ignores G", kd::valid_problem(scale(2, 6, 1, 5, 4, bcos_math::kModeOne)));
  kc::ScaleProblem zero = scale(2, 8, 1, 5, 4, bcos_math::kModeGeneral);
  zero.scale = 0.0;
  check_true("scale 0 invalid", !kd::valid_problem(zero));
}

void test_dau() {
  // P = 100: ceil(100 / 256) = 1 chunk of 100 pixels
  kc::DauProblem d{100, 3, 4, 5, bcos_math::kDauSquash};
  kd::DauChunks c = kd::dau_chunking(d);
  check_eq("dau P=100 chunks", c.chunks, 1);
  check_eq("dau P=100 chunk_len", c.chunk_len, 100);
  // workspace: 2 * P * O + chunks * O * R * R = 600 + 1 * 3 * 25 = 675
  check_eq("dau workspace with m", kd::dau_workspace_elems(d, true), 675);
  check_eq("dau workspace without m", kd::dau_workspace_elems(d, false), 600);
  // P = 1000: ceil(1000 / 256) = 4 chunks of ceil(1000 / 4) = 250
  d.P = 1000;
  c = kd::dau_chunking(d);
  check_eq("dau P=1000 chunks", c.chunks, 4);
  check_eq("dau P=1000 chunk_len", c.chunk_len, 250);
  // P = 10^6: ceil(10^6 / 256) = 3907 chunks, capped at 64, of ceil(10^6 / 64) = 15625
  d.P = 1000000;
  c = kd::dau_chunking(d);
  check_eq("dau chunks capped", c.chunks, 64);
  check_eq("dau capped chunk_len", c.chunk_len, 15625);
  check_eq("dau workspace capped", kd::dau_workspace_elems(d, true), 2LL * 1000000 * 3 + 64 * 3 * 25);
  // P = 0 still has one (empty) chunk
  d.P = 0;
  check_eq("dau P=0 chunks", kd::dau_chunking(d).chunks, 1);
  check_eq("dau za pixels, R=5", kd::dau_za_pixels_per_tile(5), 51);
  check_eq("dau za pixels, R=256", kd::dau_za_pixels_per_tile(256), 1);
  check_eq("dau za pixels, R=512", kd::dau_za_pixels_per_tile(512), 1);

  check_true("dau valid (bias)", kd::valid_problem(kc::DauProblem{10, 3, 4, 5, bcos_math::kDauL2}));
  check_true("dau valid (no bias)", kd::valid_problem(kc::DauProblem{10, 3, 4, 4, bcos_math::kDauSquash}));
  check_true("dau R = r + 2 invalid", !kd::valid_problem(kc::DauProblem{10, 3, 4, 6, bcos_math::kDauL2}));
  check_true("dau r = 0 invalid", !kd::valid_problem(kc::DauProblem{10, 3, 0, 1, bcos_math::kDauL2}));
  check_true("dau R above the cap invalid", !kd::valid_problem(kc::DauProblem{10, 3, 512, 513, bcos_math::kDauL2}));
  check_true("dau unknown norm invalid", !kd::valid_problem(kc::DauProblem{10, 3, 4, 5, 7}));
}

void test_lwta() {
  // x (2, 6, 3) with U = 2: 2 * 3 * 3 = 18 blocks
  const kc::LwtaProblem p{2, 6, 3, 2, 1.0, false, 0, 0};
  check_eq("lwta blocks", kd::lwta_blocks(p), 18);
  // block idx = (t, b) = (idx / inner, idx % inner), t = (outer, block of C)
  check_eq("lwta base of block 0", kd::lwta_block_base(6, 3, 0, 2), 0);
  // idx 1: b = 1, t = 0 -> element 1
  check_eq("lwta base of block 1", kd::lwta_block_base(6, 3, 1, 2), 1);
  // idx 4: b = 1, t = 1 (outer 0, block 1 = channel 2) -> 2 * 3 + 1 = 7
  check_eq("lwta base of block 4", kd::lwta_block_base(6, 3, 4, 2), 7);
  // idx 10: b = 1, t = 3 (outer 1, block 0) -> (1 * 6 + 0) * 3 + 1 = 19
  check_eq("lwta base of block 10", kd::lwta_block_base(6, 3, 10, 2), 19);
  // idx 17 (the last): b = 2, t = 5 (outer 1, block 2 = channel 4) -> (6 + 4) * 3 + 2 = 32
  check_eq("lwta base of the last block", kd::lwta_block_base(6, 3, 17, 2), 32);

  check_true("lwta valid", kd::valid_problem(p));
  check_true("lwta U not dividing C invalid", !kd::valid_problem(kc::LwtaProblem{2, 6, 3, 4, 1.0, false, 0, 0}));
  check_true("lwta U = 257 invalid", !kd::valid_problem(kc::LwtaProblem{1, 257, 1, 257, 1.0, false, 0, 0}));
  check_true("lwta temperature 0 invalid", !kd::valid_problem(kc::LwtaProblem{2, 6, 3, 2, 0.0, false, 0, 0}));
  check_true("lwta deterministic needs no temperature",
             kd::valid_problem(kc::LwtaProblem{2, 6, 3, 2, 0.0, true, 0, 0}));
}

void test_csg() {
  // NCHW, HW = 49: a warp per (n, c) row, 8 rows per block: ceil(4 * 10 / 8) = 5 blocks
  kc::CsgProblem p{4, 10, 49, 3, false};
  check_true("csg nchw by rows", !kd::csg_backward_by_columns(p));
  check_eq("csg nchw grid", kd::csg_backward_grid(p), 5);
  // channels_last: a thread per row: ceil(40 / 256) = 1 block
  p.channels_last = true;
  check_true("csg nhwc by columns", kd::csg_backward_by_columns(p));
  check_eq("csg nhwc grid", kd::csg_backward_grid(p), 1);
  // (N, C) input: HW == 1 takes the column kernel in either layout
  p = kc::CsgProblem{300, 10, 1, 3, false};
  check_true("csg HW=1 by columns", kd::csg_backward_by_columns(p));
  check_eq("csg HW=1 grid", kd::csg_backward_grid(p), 12);  // ceil(3000 / 256)

  check_true("csg valid", kd::valid_problem(kc::CsgProblem{4, 10, 49, 3, false}));
  check_true("csg empty batch valid", kd::valid_problem(kc::CsgProblem{0, 10, 49, 3, false}));
  check_true("csg K = 0 invalid", !kd::valid_problem(kc::CsgProblem{4, 10, 49, 0, false}));
}

}  // namespace

int main() { return bcos_test::run({test_grid_for, test_scale_grid, test_dau, test_lwta, test_csg}); }
