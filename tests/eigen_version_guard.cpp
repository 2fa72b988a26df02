// Compiled (not run) by the test eigen.version_guard, which expects this to FAIL with the library's
// message: an Eigen that reports 3.5 must be refused, since the deterministic GEMM needs 3.4's internals.
#include <Eigen/Core>

#undef EIGEN_MAJOR_VERSION
#define EIGEN_MAJOR_VERSION 5  // Eigen numbers 3.4.0 as WORLD.MAJOR.MINOR

#include <peer/core/gemm.hpp>

int main() { return 0; }
