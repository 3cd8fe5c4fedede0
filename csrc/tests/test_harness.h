// Counters and the main loop shared by the plain C++ tests in csrc/tests.
#ifndef BCOS_KERNELS_TESTS_TEST_HARNESS_H_
#define BCOS_KERNELS_TESTS_TEST_HARNESS_H_

#include <cstdio>
#include <initializer_list>

namespace bcos_test {

inline int g_failures = 0;
inline int g_checks = 0;

// Counts one check; returns ok so that the caller can print its own message on failure.
inline bool count(bool ok) {
  ++g_checks;
  if (!ok) ++g_failures;
  return ok;
}

// Runs the tests, prints the totals; the exit status is 0 when every check passed.
inline int run(std::initializer_list<void (*)()> tests) {
  for (auto test : tests) test();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}

}  // namespace bcos_test

#endif  // BCOS_KERNELS_TESTS_TEST_HARNESS_H_
