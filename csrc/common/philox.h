// Counter-based random numbers (Philox4x32-10, Salmon et al., "Parallel
// random numbers: as easy as 1, 2, 3", SC 2011), shared by the CUDA kernels
// and the host tests.
//
// Why our own few lines instead of curand: a counter-based generator is a
// pure function of (key, counter), so the LWTA kernels can re-draw in the
// backward exactly the numbers of the forward without storing them, and the
// same function compiled for the host lets the C++ tests check it against the
// published known-answer vectors and lets any backend reproduce a draw.
//
// The stream used by the ops (see lwta_uniform): element i of a call with
// (seed, offset) gets word i % 4 of philox4x32_10(counter = (i / 4, offset),
// key = seed), turned into a float in [0, 1) with its top 24 bits.
#ifndef BCOS_KERNELS_COMMON_PHILOX_H_
#define BCOS_KERNELS_COMMON_PHILOX_H_

#ifndef BCOS_HD
#if defined(__CUDACC__)
#define BCOS_HD __host__ __device__
#else
#define BCOS_HD
#endif
#endif

#include <cstdint>

namespace bcos_math {

struct Philox4x32 {
  std::uint32_t v[4];
};

// Round multipliers and key increments of Philox4x32 (from the paper).
constexpr std::uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr std::uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr std::uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr std::uint32_t kPhiloxW1 = 0xBB67AE85u;

BCOS_HD inline std::uint32_t mul_hi32(std::uint32_t a, std::uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<std::uint32_t>((static_cast<std::uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds: each multiplies two words (keeping both halves of the
// products), mixes in the key and permutes; the key is bumped between rounds.
BCOS_HD inline Philox4x32 philox4x32_10(std::uint32_t c0, std::uint32_t c1, std::uint32_t c2, std::uint32_t c3,
                                        std::uint32_t k0, std::uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const std::uint32_t hi0 = mul_hi32(kPhiloxM0, c0);
    const std::uint32_t lo0 = kPhiloxM0 * c0;
    const std::uint32_t hi1 = mul_hi32(kPhiloxM1, c2);
    const std::uint32_t lo1 = kPhiloxM1 * c2;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// A float in [0, 1): the top 24 bits of a word times 2^-24.  Never 1, so the
// Gumbel transform of LWTA stays finite (see lwta_math.h).
BCOS_HD inline float uniform_from_bits(std::uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// The uniform of element `index` of the call (seed, offset).
BCOS_HD inline float lwta_uniform(std::uint64_t seed, std::uint64_t offset, std::uint64_t index) {
  const std::uint64_t block = index >> 2;
  const Philox4x32 r = philox4x32_10(static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32),
                                     static_cast<std::uint32_t>(offset), static_cast<std::uint32_t>(offset >> 32),
                                     static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
  // word index % 4, chosen with selects: indexing r.v with a run-time value
  // would put r in local memory on the GPU
  const std::uint32_t lo = (index & 1u) ? r.v[1] : r.v[0];
  const std::uint32_t hi = (index & 1u) ? r.v[3] : r.v[2];
  return uniform_from_bits((index & 2u) ? hi : lo);
}

}  // namespace bcos_math

#endif  // BCOS_KERNELS_COMMON_PHILOX_H_
