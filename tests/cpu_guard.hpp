// Test binaries built for instructions the CPU may lack (-mavx512f, -mavx512bf16, -mamx-*): every test is
// skipped, before any runs, on a CPU without them. A per-test guard alone is not enough: a test that forgot
// it died of SIGILL on an AVX2-only CPU (qemu-x86_64 -cpu max).
#ifndef PEER_TESTS_CPU_GUARD_HPP
#define PEER_TESTS_CPU_GUARD_HPP

#include <gtest/gtest.h>

namespace peer_test {

class SkipAllTestsUnless : public ::testing::Environment {
 public:
  SkipAllTestsUnless(bool (*has_path)(), const char* why) : has_path_(has_path), why_(why) {}
  void SetUp() override {
    if (!has_path_()) GTEST_SKIP() << why_;
  }

 private:
  bool (*has_path_)();
  const char* why_;
};

/// Whether this CPU has the vector instructions this translation unit is compiled for: AVX-512F, or AVX2
/// and FMA (tests/CMakeLists.txt, peer_add_isa_tests); always true for a portable build.
inline bool cpu_has_build_path() {
#if defined(__AVX512F__)
  return __builtin_cpu_supports("avx512f");
#elif defined(__AVX2__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return true;
#endif
}

/// Registers the guard (call from a namespace-scope initializer); GoogleTest owns the environment.
inline const ::testing::Environment* skip_all_tests_unless(bool (*has_path)(), const char* why) {
  return ::testing::AddGlobalTestEnvironment(new SkipAllTestsUnless(has_path, why));
}

}  // namespace peer_test

#endif  // PEER_TESTS_CPU_GUARD_HPP
