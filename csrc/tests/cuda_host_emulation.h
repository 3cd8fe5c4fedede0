// Host emulation of the CUDA features the kernels of csrc/cuda use, so that
// the kernels can run (slowly) on a machine without a GPU in tests.
//
// Compile a kernel file as C++ with BCOS_CUDA_HOST_EMULATION defined (see
// scripts/check_cuda.sh): csrc/cuda/cuda_common.cuh then includes this file
// instead of <cuda_runtime.h>, and its launch_kernel() runs the blocks of a
// launch one after the other, each with one host thread per CUDA thread
// (all running at once, from a pool):
//   - threadIdx / blockIdx are thread_local, blockDim / gridDim global;
//   - __syncthreads() is a std::barrier over the block's threads, so a
//     barrier that not every thread reaches deadlocks here (a bug on a GPU too);
//   - __shared__ variables become function statics (blocks run one after
//     the other, so a block has them to itself); the dynamic shared memory is
//     refilled with NaN bytes before every block, so that reading it before
//     writing shows up;
//   - __shfl_down_sync exchanges through per-warp slots and barriers.
// Only what the kernels use is here.  Not for production: it exists to run
// the real kernel code, index arithmetic and reductions included, against
// the CPU ops and the Python references (csrc/tests/test_cuda_emulation.py).
#ifndef BCOS_KERNELS_TESTS_CUDA_HOST_EMULATION_H_
#define BCOS_KERNELS_TESTS_CUDA_HOST_EMULATION_H_

#include <cuda_runtime_api.h>  // cudaError_t, cudaStream_t, dim3 (host-compilable)

#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// Execution-space keywords: nothing on the host.  crt/host_defines.h makes
// __shared__ empty; here it must give one object per block: a static.
#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace bcos_emulation {

constexpr int kWarpSize = 32;

struct BlockState {
  std::unique_ptr<std::barrier<>> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<double> shuffle_slots;  // kWarpSize per warp (values up to 8 bytes)
  std::vector<unsigned char> dynamic_smem;
};

inline BlockState& block_state() {
  static BlockState state;
  return state;
}

inline thread_local int linear_thread_id = 0;

// Worker threads kept across blocks and launches (creating 256 threads per
// block dominated the run time).  run(n, fn) calls fn(0) ... fn(n - 1), each
// on its own thread, concurrently, and returns when all are done.
class ThreadPool {
 public:
  template <typename Fn>
  void run(int n, const Fn& fn) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (static_cast<int>(workers_.size()) < n) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index]() { work(index); });
      workers_.back().detach();  // parked forever once the tests end; the process exit ends them
    }
    task_ = [&fn](int i) { fn(i); };
    active_ = n;
    remaining_ = n;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [this]() { return remaining_ == 0; });
    task_ = nullptr;
  }

 private:
  void work(int index) {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      start_.wait(lock, [&]() { return generation_ != seen; });
      seen = generation_;
      if (index >= active_) continue;
      std::function<void(int)> task = task_;
      lock.unlock();
      task(index);
      lock.lock();
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  std::function<void(int)> task_;
  int active_ = 0;
  int remaining_ = 0;
  std::uint64_t generation_ = 0;
};

inline ThreadPool& thread_pool() {
  static ThreadPool* pool = new ThreadPool();  // never destroyed: its threads stay parked
  return *pool;
}

inline unsigned char* dynamic_shared_memory() { return block_state().dynamic_smem.data(); }

template <typename... Params>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Params... args) {
  const unsigned int threads = block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaErrorInvalidValue;
  gridDim = grid;
  blockDim = block;
  BlockState& st = block_state();
  const unsigned int warps = (threads + kWarpSize - 1) / kWarpSize;
  for (unsigned int bz = 0; bz < grid.z; ++bz) {
    for (unsigned int by = 0; by < grid.y; ++by) {
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        st.block_barrier = std::make_unique<std::barrier<>>(threads);
        st.warp_barriers.clear();
        for (unsigned int w = 0; w < warps; ++w) {
          const unsigned int lanes = threads - w * kWarpSize < kWarpSize ? threads - w * kWarpSize : kWarpSize;
          st.warp_barriers.push_back(std::make_unique<std::barrier<>>(lanes));
        }
        st.shuffle_slots.assign(static_cast<size_t>(warps) * kWarpSize, 0.0);
        st.dynamic_smem.assign(smem_bytes + 16, 0xFF);  // all-ones bytes: NaN in float and double
        thread_pool().run(static_cast<int>(threads), [&](int linear) {
          const unsigned int tx = static_cast<unsigned int>(linear) % block.x;
          const unsigned int ty = static_cast<unsigned int>(linear) / block.x % block.y;
          const unsigned int tz = static_cast<unsigned int>(linear) / (block.x * block.y);
          threadIdx = uint3{tx, ty, tz};
          blockIdx = uint3{bx, by, bz};
          linear_thread_id = linear;
          kernel(args...);
        });
      }
    }
  }
  return cudaSuccess;
}

}  // namespace bcos_emulation

inline void __syncthreads() { bcos_emulation::block_state().block_barrier->arrive_and_wait(); }

template <typename V>
V __shfl_down_sync(unsigned int /*mask: all lanes in the kernels*/, V value, unsigned int delta) {
  static_assert(sizeof(V) <= sizeof(double), "shuffle of a value wider than 8 bytes");
  bcos_emulation::BlockState& st = bcos_emulation::block_state();
  const int warp = bcos_emulation::linear_thread_id / bcos_emulation::kWarpSize;
  const int lane = bcos_emulation::linear_thread_id % bcos_emulation::kWarpSize;
  double* slots = st.shuffle_slots.data() + warp * bcos_emulation::kWarpSize;
  std::memcpy(&slots[lane], &value, sizeof(V));
  st.warp_barriers[warp]->arrive_and_wait();
  V result = value;
  if (lane + static_cast<int>(delta) < bcos_emulation::kWarpSize) std::memcpy(&result, &slots[lane + delta], sizeof(V));
  st.warp_barriers[warp]->arrive_and_wait();
  return result;
}

#endif  // BCOS_KERNELS_TESTS_CUDA_HOST_EMULATION_H_
