// Shared helpers of the unit tests: random data, a naive loop PEER layer, central-difference checks.
#ifndef PEER_TESTS_TEST_UTIL_HPP
#define PEER_TESTS_TEST_UTIL_HPP

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <peer/peer.hpp>
#include <peer/testing/gradient_check.hpp>

#include <sys/wait.h>
#include <unistd.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace peer_test {

// Expects `call` to throw E whose message contains `text`.
template <typename E, typename F>
void expect_error(F&& call, const std::string& text) {
  try {
    call();
    ADD_FAILURE() << "no exception; expected: " << text;
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << "message: " << e.what() << "\nexpected: " << text;
  }
}


using peer::Index;
template <typename S>
using Mat = peer::RowMatrix<S>;

/// Uniform(-1, 1) matrix from a seeded std::mt19937.
template <typename S>
Mat<S> random_matrix(Index rows, Index cols, unsigned seed, double scale = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(-scale, scale);
  Mat<S> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<S>(dist(gen));
  return m;
}

/// Every byte of a Parameters object's storage (dense, buffers, tables), for bitwise comparisons.
template <typename S>
std::vector<unsigned char> storage_bytes(const peer::Parameters<S>& p) {
  std::vector<unsigned char> out;
  auto add = [&](const S* d, Index n) {
    const auto* c = reinterpret_cast<const unsigned char*>(d);
    out.insert(out.end(), c, c + n * static_cast<Index>(sizeof(S)));
  };
  add(p.dense_data(), p.layout().dense_size());
  add(p.buffer_data(), p.layout().buffer_size());
  for (std::size_t t = 0; t < p.layout().tables().size(); ++t) {
    const auto& table = p.table(peer::TableHandle{static_cast<int>(t)});
    const auto* c = static_cast<const unsigned char*>(table.storage_data());
    out.insert(out.end(), c, c + table.bytes());
  }
  return out;
}

/// A small PEER configuration for tests.
inline peer::PeerConfig small_config(Index d = 8, Index n = 4, Index heads = 2, Index dk = 8, Index k = 3,
                                     Index kk = 3) {
  peer::PeerConfig c;
  c.model_dim = d;
  c.num_experts = n * n;
  c.num_heads = heads;
  c.key_dim = dk;
  c.top_k = k;
  c.sub_key_top_k = kk;
  return c;
}

/// Sets the thread count for the scope, with dynamic teams off so a region gets all of them (tests may;
/// the library never does).
class ThreadScope {
 public:
  explicit ThreadScope(int threads) {
#if defined(_OPENMP)
    saved_ = omp_get_max_threads();
    saved_dynamic_ = omp_get_dynamic();
    omp_set_dynamic(0);
    omp_set_num_threads(threads);
#else
    (void)threads;
#endif
  }
  ~ThreadScope() {
#if defined(_OPENMP)
    omp_set_num_threads(saved_);
    omp_set_dynamic(saved_dynamic_);
#endif
  }

 private:
  int saved_ = 1;
  int saved_dynamic_ = 0;
};

/// The team size the library's parallel loop really gets now (1 without OpenMP): what a determinism test
/// must check, since OMP_THREAD_LIMIT or a dynamic team would silently run its "4 threads" on one.
inline int library_team_size() {
  std::atomic<int> seen{1};
  peer::parallel_for(64, 1, [&](Index, Index, int) {
#if defined(_OPENMP)
    int n = omp_get_num_threads();
    int cur = seen.load();
    while (n > cur && !seen.compare_exchange_weak(cur, n)) {
    }
#endif
  });
  return seen.load();
}

/// Crash safety of a save: forks `trials` children that each run save(trial) and exit, and SIGKILLs each
/// after a delay spread over [0, 1.5 x one save's duration), so the kills land before, during and after
/// the writes, the fsyncs and the rename. After every child, check() must accept what is at the path (a
/// complete old or new file). save() runs no OpenMP (a forked child must not). Returns how many children
/// died by the signal, i.e. were killed before they finished.
template <typename Save, typename Check>
int kill_during_saves(int trials, Save&& save, Check&& check) {
  save(0);
  check();
  // One child left to finish: how long fork, save and exit take (longer than a save in this process).
  const auto t0 = std::chrono::steady_clock::now();
  const pid_t first = ::fork();
  if (first == 0) {
    try {
      save(0);
    } catch (...) {
      ::_exit(2);
    }
    ::_exit(0);
  }
  int first_status = 0;
  ::waitpid(first, &first_status, 0);
  const double once = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_TRUE(WIFEXITED(first_status) && WEXITSTATUS(first_status) == 0) << "an unkilled save failed";
  check();
  std::mt19937 gen(2024);
  std::uniform_real_distribution<double> delay(0.0, 1.5 * once);
  int killed = 0;
  for (int trial = 1; trial <= trials; ++trial) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      ADD_FAILURE() << "fork failed";
      return killed;
    }
    if (pid == 0) {
      try {
        save(trial);
      } catch (...) {
        ::_exit(2);
      }
      ::_exit(0);
    }
    ::usleep(static_cast<useconds_t>(delay(gen) * 1e6));
    ::kill(pid, SIGKILL);
    int status = 0;
    ::waitpid(pid, &status, 0);
    if (WIFSIGNALED(status)) {
      ++killed;
    } else {
      EXPECT_EQ(WEXITSTATUS(status), 0) << "trial " << trial << ": the save failed";
    }
    check();
  }
  return killed;
}

/// Equal bit patterns (memcmp), unlike operator== (-0 == +0, NaN != NaN): what "bitwise" means.
template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}
template <typename S>
bool same_bits(const Mat<S>& a, const Mat<S>& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         (a.size() == 0 || std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(S)) == 0);
}
inline bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

/// The naive PEER layer (or product-key memory, when the table is "values"): plain loops in double over
/// the parameters read by name, exhaustive retrieval over all N full keys [c_a ; c'_b] with a sort.
/// Written from the papers, independent of the library.
struct NaiveOutput {
  Mat<double> y;                        // [B, D]
  std::vector<std::vector<int>> ids;    // [B * H][k]
  std::vector<double> margin;           // [B * H] score gap between rank k and rank k + 1 (0 if N == k)
};

template <typename S>
NaiveOutput naive_peer_forward(const peer::PeerConfig& c, peer::Parameters<S>& p, const Mat<S>& x_in,
                               peer::Mode mode, const peer::RowMask* mask = nullptr) {
  const Index b = x_in.rows(), d = c.model_dim, h_count = c.num_heads, dk = c.key_dim, half = dk / 2;
  const Index n = c.num_sub_keys(), nn = n * n, k = c.top_k, f = h_count * dk;
  const Mat<double> x = x_in.template cast<double>();
  const Mat<double> w = p.find("query.weight").template cast<double>();
  Mat<double> q(b, f);
  for (Index t = 0; t < b; ++t) {
    for (Index o = 0; o < f; ++o) {
      double s = 0;
      for (Index i = 0; i < d; ++i) s += w(o, i) * x(t, i);
      if (c.query_bias == peer::Bias::kLearned) s += static_cast<double>(p.find("query.bias")(0, o));
      q(t, o) = s;
    }
  }
  if (c.query_norm == peer::QueryNorm::kBatchNorm) {
    const auto gamma = p.find("query.norm.weight");
    const auto beta = p.find("query.norm.bias");
    for (Index o = 0; o < f; ++o) {
      double mean, var;
      if (mode == peer::Mode::kTrain) {
        double sum = 0, count = 0;
        for (Index t = 0; t < b; ++t) {
          if (mask == nullptr || (*mask)[t]) {
            sum += q(t, o);
            count += 1;
          }
        }
        mean = sum / count;
        double sq = 0;
        for (Index t = 0; t < b; ++t) {
          if (mask == nullptr || (*mask)[t]) sq += (q(t, o) - mean) * (q(t, o) - mean);
        }
        var = sq / count;
      } else {
        mean = static_cast<double>(p.find("query.norm.running_mean")(0, o));
        var = static_cast<double>(p.find("query.norm.running_var")(0, o));
      }
      for (Index t = 0; t < b; ++t) {
        q(t, o) = (q(t, o) - mean) / std::sqrt(var + c.norm_epsilon) * static_cast<double>(gamma(0, o)) +
                  static_cast<double>(beta(0, o));
      }
    }
  } else if (c.query_norm == peer::QueryNorm::kLayerNorm || c.query_norm == peer::QueryNorm::kHalfLayerNorm) {
    // Groups of a head's Dk values (layer_norm) or of each half's Dk / 2 with one shared affine map
    // [Dk / 2] (half_layer_norm).
    const bool per_half = c.query_norm == peer::QueryNorm::kHalfLayerNorm;
    const Index group = per_half ? dk / 2 : dk;
    const auto gamma = p.find("query.norm.weight");
    const auto beta = p.find("query.norm.bias");
    for (Index t = 0; t < b; ++t) {
      for (Index g = 0; g < h_count * dk / group; ++g) {
        double mean = 0, var = 0;
        for (Index i = 0; i < group; ++i) mean += q(t, g * group + i);
        mean /= static_cast<double>(group);
        for (Index i = 0; i < group; ++i) var += (q(t, g * group + i) - mean) * (q(t, g * group + i) - mean);
        var /= static_cast<double>(group);
        for (Index i = 0; i < group; ++i) {
          const Index o = g * group + i, a = per_half ? i : o;
          q(t, o) = (q(t, o) - mean) / std::sqrt(var + c.norm_epsilon) * static_cast<double>(gamma(0, a)) +
                    static_cast<double>(beta(0, a));
        }
      }
    }
  }
  const auto left = p.find("sub_keys.left");
  const auto right = p.find("sub_keys.right");
  // A product-key memory has a "values" table [N, D] (y += g v); a PEER layer an "experts" table.
  const bool values = p.layout().tables().front().name == "values";
  const auto table = p.find(values ? "values" : "experts");
  NaiveOutput out;
  out.y = Mat<double>::Zero(b, d);
  out.ids.resize(static_cast<std::size_t>(b * h_count));
  out.margin.resize(static_cast<std::size_t>(b * h_count));
  std::vector<std::pair<double, int>> all(static_cast<std::size_t>(nn));
  for (Index t = 0; t < b; ++t) {
    for (Index h = 0; h < h_count; ++h) {
      const Index off = c.key_sharing == peer::KeySharing::kPerHead ? h * n : 0;
      for (Index a = 0; a < n; ++a) {
        for (Index bb = 0; bb < n; ++bb) {
          double s = 0;  // q . [c_a ; c'_b] as one dot product over Dk
          for (Index i = 0; i < half; ++i) s += q(t, h * dk + i) * static_cast<double>(left(off + a, i));
          for (Index i = 0; i < half; ++i) s += q(t, h * dk + half + i) * static_cast<double>(right(off + bb, i));
          all[static_cast<std::size_t>(a * n + bb)] = {s, static_cast<int>(a * n + bb)};
        }
      }
      std::sort(all.begin(), all.end(), [](const auto& l, const auto& r) {
        return l.first > r.first || (l.first == r.first && l.second < r.second);
      });
      const std::size_t th = static_cast<std::size_t>(t * h_count + h);
      out.margin[th] = nn > k ? all[static_cast<std::size_t>(k - 1)].first - all[static_cast<std::size_t>(k)].first : 1e300;
      std::vector<double> s(static_cast<std::size_t>(k)), g(static_cast<std::size_t>(k));
      for (Index j = 0; j < k; ++j) {
        s[static_cast<std::size_t>(j)] = all[static_cast<std::size_t>(j)].first;
        out.ids[th].push_back(all[static_cast<std::size_t>(j)].second);
      }
      // Gates.
      if (c.gating == peer::Gating::kSoftmax) {
        double mx = s[0], z = 0;
        for (double v : s) mx = std::max(mx, v);
        for (std::size_t j = 0; j < s.size(); ++j) z += std::exp(s[j] - mx);
        for (std::size_t j = 0; j < s.size(); ++j) g[j] = std::exp(s[j] - mx) / z;
      } else if (c.gating == peer::Gating::kReLU) {
        for (std::size_t j = 0; j < s.size(); ++j) g[j] = std::max(0.0, s[j]);
      } else {
        for (std::size_t j = 0; j < s.size(); ++j) g[j] = 1.0 / (1.0 + std::exp(-s[j]));
      }
      // Experts: y += g sigma(u . x) v; values: y += g v.
      for (Index j = 0; j < k; ++j) {
        const int id = out.ids[th][static_cast<std::size_t>(j)];
        if (values) {
          for (Index i = 0; i < d; ++i) out.y(t, i) += g[static_cast<std::size_t>(j)] * static_cast<double>(table(id, i));
          continue;
        }
        double zz = 0;
        for (Index i = 0; i < d; ++i) zz += static_cast<double>(table(id, i)) * x(t, i);
        double act = 0;
        switch (c.activation) {
          case peer::Activation::kReLU: act = std::max(0.0, zz); break;
          case peer::Activation::kGelu: act = 0.5 * zz * (1.0 + std::erf(zz / std::sqrt(2.0))); break;
          case peer::Activation::kGeluTanh:
            act = 0.5 * zz * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (zz + 0.044715 * zz * zz * zz)));
            break;
          case peer::Activation::kSiLU: act = zz / (1.0 + std::exp(-zz)); break;
        }
        for (Index i = 0; i < d; ++i) {
          out.y(t, i) += g[static_cast<std::size_t>(j)] * act * static_cast<double>(table(id, d + i));
        }
      }
    }
  }
  return out;
}

/// Central-difference check of one tensor's gradient with the library's public checker
/// (peer/testing/gradient_check.hpp), every failure reported as a test failure. Entries whose
/// perturbation changes the selected experts (same_selection() false) are skipped.
struct GradCheckStats {
  int checked = 0;
  int skipped = 0;
  double max_error = 0;
};

inline GradCheckStats check_entries(const std::string& what, double* value, Index count,
                                    const std::function<double(Index)>& analytic,
                                    const std::function<double()>& loss,
                                    const std::function<bool()>& same_selection, double eps = 1e-6,
                                    double rtol = 1e-6, double atol = 1e-8) {
  peer::testing::GradientCheckOptions options;
  options.epsilon = eps;
  options.rtol = rtol;
  options.atol = atol;
  const auto r = peer::testing::check_entries(what, value, count, analytic, loss, same_selection, options);
  for (const auto& f : r.failures) ADD_FAILURE() << f;
  return GradCheckStats{static_cast<int>(r.checked), static_cast<int>(r.skipped), r.max_error};
}

}  // namespace peer_test

#endif  // PEER_TESTS_TEST_UTIL_HPP
