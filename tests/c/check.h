/* The C tests' one assertion: CHECK(condition, printf-style message) counts a pass or prints the failure
 * with its line; each test ends by printing "N passed, M failed". One translation unit per test program. */
#ifndef PEER_TESTS_C_CHECK_H
#define PEER_TESTS_C_CHECK_H

#include <stdio.h>

static int passed = 0, failed = 0;

#define CHECK(cond, ...)                  \
  do {                                    \
    if (cond) {                           \
      ++passed;                           \
    } else {                              \
      ++failed;                           \
      printf("FAIL line %d: ", __LINE__); \
      printf(__VA_ARGS__);                \
      printf("\n");                       \
    }                                     \
  } while (0)

#endif /* PEER_TESTS_C_CHECK_H */
