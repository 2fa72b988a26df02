// MoeFfw, the coarse mixture-of-experts baseline: forward against a naive loop version (both routing modes,
// float and double), central-difference gradients in double (with and without the load-balancing loss),
// contracts (assign / add, determinism across thread counts, errors) and the FLOP and parameter formulas.
#include "test_util.hpp"

namespace {

using namespace peer_test;

peer::MoeConfig small_moe(peer::MoeRouting routing, Index d = 6, Index e = 5, Index f = 4, Index k = 2) {
  peer::MoeConfig c;
  c.model_dim = d;
  c.num_experts = e;
  c.expert_hidden = f;
  c.top_k = k;
  c.routing = routing;
  return c;
}

// Random parameters, biases included, with a router scaled so probabilities spread well apart.
template <typename S>
void randomize(const peer::MoeFfw<S>& layer, peer::Parameters<S>& params, unsigned seed) {
  for (const auto& spec : layer.layout().dense()) {
    const double scale = spec.name == "moe.router.weight" ? 1.5 : 0.6;
    params.find(spec.name) = random_matrix<S>(spec.rows, spec.cols, seed++, scale);
  }
}

// ---- The naive layer: plain loops in double over the parameters read by name, written from the equations.
struct NaiveMoe {
  Mat<double> y;
  std::vector<std::vector<std::pair<int, double>>> routes;  // per token: (expert, gate), expert ascending
  double aux = 0;
  double margin = 1e300;  // smallest score gap at a selection boundary (top-k / top-C)
};

double naive_activation(peer::Activation a, double z) {
  switch (a) {
    case peer::Activation::kReLU: return std::max(0.0, z);
    case peer::Activation::kGelu: return 0.5 * z * (1.0 + std::erf(z / std::sqrt(2.0)));
    case peer::Activation::kGeluTanh:
      return 0.5 * z * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (z + 0.044715 * z * z * z)));
    case peer::Activation::kSiLU: return z / (1.0 + std::exp(-z));
  }
  return z;
}

template <typename S>
NaiveMoe naive_moe(const peer::MoeConfig& c, peer::Parameters<S>& params, const Mat<S>& x_in,
                   const peer::RowMask* mask = nullptr) {
  const Index b = x_in.rows(), d = c.model_dim, e_count = c.num_experts, f = c.expert_hidden, k = c.top_k;
  const bool bias = c.bias == peer::Bias::kLearned;
  const Mat<double> x = x_in.template cast<double>();
  const Mat<double> wr = params.find("moe.router.weight").template cast<double>();
  const Mat<double> w1 = params.find("moe.up.weight").template cast<double>();
  const Mat<double> w2 = params.find("moe.down.weight").template cast<double>();
  Mat<double> b1 = Mat<double>::Zero(1, e_count * f), b2 = Mat<double>::Zero(1, e_count * d);
  if (bias) {
    b1 = params.find("moe.up.bias").template cast<double>();
    b2 = params.find("moe.down.bias").template cast<double>();
  }
  auto counts = [&](Index t) { return mask == nullptr || (*mask)[t]; };
  // Router probabilities.
  Mat<double> p(b, e_count);
  for (Index t = 0; t < b; ++t) {
    double mx = -1e300;
    for (Index e = 0; e < e_count; ++e) {
      double s = 0;
      for (Index i = 0; i < d; ++i) s += wr(e, i) * x(t, i);
      p(t, e) = s;
      mx = std::max(mx, s);
    }
    double z = 0;
    for (Index e = 0; e < e_count; ++e) z += std::exp(p(t, e) - mx);
    for (Index e = 0; e < e_count; ++e) p(t, e) = std::exp(p(t, e) - mx) / z;
  }
  NaiveMoe out;
  out.routes.resize(static_cast<std::size_t>(b));
  auto by_score = [](const std::pair<double, int>& l, const std::pair<double, int>& r) {
    return l.first > r.first || (l.first == r.first && l.second < r.second);
  };
  if (c.routing == peer::MoeRouting::kTokenChoice) {
    for (Index t = 0; t < b; ++t) {
      std::vector<std::pair<double, int>> all;
      for (Index e = 0; e < e_count; ++e) all.push_back({p(t, e), static_cast<int>(e)});
      std::sort(all.begin(), all.end(), by_score);
      if (k < e_count) out.margin = std::min(out.margin, all[static_cast<std::size_t>(k - 1)].first - all[static_cast<std::size_t>(k)].first);
      double sum = 0;
      for (Index j = 0; j < k; ++j) sum += all[static_cast<std::size_t>(j)].first;
      for (Index j = 0; j < k; ++j) {
        const auto& [score, e] = all[static_cast<std::size_t>(j)];
        out.routes[static_cast<std::size_t>(t)].push_back({e, c.gate_norm == peer::MoeGateNorm::kRenormalize ? score / sum : score});
      }
    }
  } else {
    Index counted = 0;
    for (Index t = 0; t < b; ++t) counted += counts(t);
    const Index cap = std::min<Index>(counted, static_cast<Index>(std::ceil(c.capacity_factor * static_cast<double>(counted * k) / static_cast<double>(e_count))));
    for (Index e = 0; e < e_count; ++e) {
      std::vector<std::pair<double, int>> all;
      for (Index t = 0; t < b; ++t) {
        if (counts(t)) all.push_back({p(t, e), static_cast<int>(t)});
      }
      std::sort(all.begin(), all.end(), by_score);
      if (cap < counted) out.margin = std::min(out.margin, all[static_cast<std::size_t>(cap - 1)].first - all[static_cast<std::size_t>(cap)].first);
      for (Index j = 0; j < cap; ++j) {
        const auto& [score, t] = all[static_cast<std::size_t>(j)];
        out.routes[static_cast<std::size_t>(t)].push_back({static_cast<int>(e), score});
      }
    }
  }
  for (auto& r : out.routes) std::sort(r.begin(), r.end());
  // Experts.
  out.y = Mat<double>::Zero(b, d);
  for (Index t = 0; t < b; ++t) {
    for (const auto& [e, g] : out.routes[static_cast<std::size_t>(t)]) {
      std::vector<double> a(static_cast<std::size_t>(f));
      for (Index h = 0; h < f; ++h) {
        double z = b1(0, e * f + h);
        for (Index i = 0; i < d; ++i) z += w1(e * f + h, i) * x(t, i);
        a[static_cast<std::size_t>(h)] = naive_activation(c.activation, z);
      }
      for (Index o = 0; o < d; ++o) {
        double v = b2(0, e * d + o);
        for (Index h = 0; h < f; ++h) v += w2(e * d + o, h) * a[static_cast<std::size_t>(h)];
        out.y(t, o) += g * v;
      }
    }
  }
  // Load balancing: f_e over the counted rows' assignments, P_e the counted rows' mean probability.
  std::vector<double> frac(static_cast<std::size_t>(e_count), 0.0), mean(static_cast<std::size_t>(e_count), 0.0);
  double total = 0, rows = 0;
  for (Index t = 0; t < b; ++t) {
    if (!counts(t)) continue;
    rows += 1;
    for (const auto& route : out.routes[static_cast<std::size_t>(t)]) {
      frac[static_cast<std::size_t>(route.first)] += 1;
      total += 1;
    }
    for (Index e = 0; e < e_count; ++e) mean[static_cast<std::size_t>(e)] += p(t, e);
  }
  double sum = 0;
  for (Index e = 0; e < e_count; ++e) sum += frac[static_cast<std::size_t>(e)] / total * mean[static_cast<std::size_t>(e)] / rows;
  out.aux = c.load_balance_weight * static_cast<double>(e_count) * sum;
  return out;
}

// The routes a forward produced, per token (expert, gate), expert ascending.
template <typename S>
std::vector<std::vector<std::pair<int, double>>> routes_of(const typename peer::MoeFfw<S>::Cache& cache) {
  std::vector<std::vector<std::pair<int, double>>> r(static_cast<std::size_t>(cache.batch()));
  for (Index t = 0; t < cache.batch(); ++t) {
    for (std::int64_t i = cache.token_begin[static_cast<std::size_t>(t)]; i < cache.token_begin[static_cast<std::size_t>(t) + 1]; ++i) {
      EXPECT_EQ(cache.token[static_cast<std::size_t>(i)], t);
      r[static_cast<std::size_t>(t)].push_back({cache.expert[static_cast<std::size_t>(i)], static_cast<double>(cache.gate[i])});
    }
    std::sort(r[static_cast<std::size_t>(t)].begin(), r[static_cast<std::size_t>(t)].end());
  }
  return r;
}

struct ForwardCase {
  std::string name;
  peer::MoeConfig config;
  bool mask = false;
  Index batch = 13;
};

std::vector<ForwardCase> forward_cases() {
  using R = peer::MoeRouting;
  std::vector<ForwardCase> cases;
  cases.push_back({"token choice, renormalized", small_moe(R::kTokenChoice)});
  ForwardCase plain{"token choice, g = p, no bias, silu, top 3", small_moe(R::kTokenChoice, 6, 5, 4, 3)};
  plain.config.gate_norm = peer::MoeGateNorm::kNone;
  plain.config.bias = peer::Bias::kNone;
  plain.config.activation = peer::Activation::kSiLU;
  cases.push_back(plain);
  ForwardCase top1{"token choice, top 1, balance loss, mask", small_moe(R::kTokenChoice, 6, 5, 4, 1)};
  top1.config.load_balance_weight = 0.3;
  top1.mask = true;
  cases.push_back(top1);
  ForwardCase ec{"expert choice", small_moe(R::kExpertChoice)};
  ec.config.load_balance_weight = 0.5;
  cases.push_back(ec);
  ForwardCase ec2{"expert choice, c = 1.5, relu, mask", small_moe(R::kExpertChoice, 6, 4, 3, 1)};
  ec2.config.capacity_factor = 1.5;
  ec2.config.activation = peer::Activation::kReLU;
  ec2.mask = true;
  cases.push_back(ec2);
  // Sizes that take top_k's vectorized path (k <= 32 of n >= 128): over 130 experts, and over 200 tokens.
  cases.push_back({"token choice, 130 experts", small_moe(R::kTokenChoice, 6, 130, 2, 2)});
  ForwardCase wide{"expert choice, 200 tokens, top 1 of 16", small_moe(R::kExpertChoice, 6, 16, 2, 1), true, 200};
  cases.push_back(wide);
  return cases;
}

template <typename S>
void check_forward_against_naive(double tol) {
  for (const ForwardCase& tc : forward_cases()) {
    SCOPED_TRACE(tc.name);
    peer::MoeFfw<S> layer(tc.config);
    auto params = layer.make_parameters(11);
    randomize(layer, params, 21);
    const Index b = tc.batch;
    const Mat<S> x = random_matrix<S>(b, tc.config.model_dim, 5);
    peer::RowMask mask = peer::RowMask::Constant(b, true);
    mask[2] = mask[7] = mask[8] = false;
    const peer::RowMask* m = tc.mask ? &mask : nullptr;
    typename peer::MoeFfw<S>::Cache cache;
    Mat<S> y(b, tc.config.model_dim);
    layer.forward(params, x, y, cache, peer::Mode::kTrain, m);
    const NaiveMoe naive = naive_moe(tc.config, params, x, m);
    ASSERT_GT(naive.margin, 1e-6) << "the data must keep selections away from ties";
    const auto routes = routes_of<S>(cache);
    for (Index t = 0; t < b; ++t) {
      const auto& got = routes[static_cast<std::size_t>(t)];
      const auto& want = naive.routes[static_cast<std::size_t>(t)];
      ASSERT_EQ(got.size(), want.size()) << "token " << t;
      for (std::size_t j = 0; j < got.size(); ++j) {
        EXPECT_EQ(got[j].first, want[j].first) << "token " << t;
        EXPECT_NEAR(got[j].second, want[j].second, tol) << "token " << t;
      }
    }
    EXPECT_LE((y.template cast<double>() - naive.y).cwiseAbs().maxCoeff(), tol * (1.0 + naive.y.cwiseAbs().maxCoeff()));
    EXPECT_NEAR(static_cast<double>(cache.aux_loss), naive.aux, tol);
    if (tc.config.routing == peer::MoeRouting::kExpertChoice && tc.mask) {
      for (Index t : {2, 7, 8}) EXPECT_TRUE(routes[static_cast<std::size_t>(t)].empty()) << "a masked row was chosen";
      EXPECT_EQ(y.row(2).cwiseAbs().maxCoeff(), S(0));
    }
  }
}

TEST(Moe, ForwardMatchesNaiveLoopsInDouble) { check_forward_against_naive<double>(1e-12); }
TEST(Moe, ForwardMatchesNaiveLoopsInFloat) { check_forward_against_naive<float>(2e-5); }

TEST(Moe, TokensAreGroupedByExpertInAscendingOrderAndMemoryIsPerAssignment) {
  for (auto routing : {peer::MoeRouting::kTokenChoice, peer::MoeRouting::kExpertChoice}) {
    const peer::MoeConfig c = small_moe(routing, 6, 5, 7, 2);
    peer::MoeFfw<double> layer(c);
    auto params = layer.make_parameters(3);
    const Index b = 17;
    const Mat<double> x = random_matrix<double>(b, 6, 1);
    Mat<double> y(b, 6);
    peer::MoeFfw<double>::Cache cache;
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    const Index m = routing == peer::MoeRouting::kTokenChoice ? b * 2 : 5 * c.capacity(b);
    EXPECT_EQ(cache.assignments(), m);
    EXPECT_EQ(cache.capacity, routing == peer::MoeRouting::kTokenChoice ? 0 : 7);  // ceil(17 * 2 / 5)
    // O(M (D + F)) buffers, nothing of size B E F.
    EXPECT_EQ(cache.hidden.rows(), m);
    EXPECT_EQ(cache.hidden.cols(), 7);
    EXPECT_EQ(cache.out.rows(), m);
    ASSERT_EQ(cache.expert_begin.size(), 6u);
    EXPECT_EQ(cache.expert_begin.back(), m);
    for (Index e = 0; e < 5; ++e) {
      for (std::int64_t s = cache.expert_begin[static_cast<std::size_t>(e)]; s < cache.expert_begin[static_cast<std::size_t>(e) + 1]; ++s) {
        const auto i = static_cast<std::size_t>(cache.slot_assignment[static_cast<std::size_t>(s)]);
        EXPECT_EQ(cache.expert[i], e);
        EXPECT_EQ(cache.assignment_slot[i], s);
        if (s > cache.expert_begin[static_cast<std::size_t>(e)]) {
          EXPECT_LT(cache.token[static_cast<std::size_t>(cache.slot_assignment[static_cast<std::size_t>(s - 1)])], cache.token[i]);
        }
      }
    }
  }
}

TEST(Moe, TiesGoToTheLowerIndex) {
  // A zero router makes every probability 1/E: token choice takes experts 0..k-1 for every token, expert
  // choice takes tokens 0..C-1 for every expert.
  for (auto routing : {peer::MoeRouting::kTokenChoice, peer::MoeRouting::kExpertChoice}) {
    const peer::MoeConfig c = small_moe(routing, 4, 6, 3, 2);
    peer::MoeFfw<float> layer(c);
    auto params = layer.make_parameters(1);
    params.find("moe.router.weight").setZero();
    const Index b = 9;
    Mat<float> y(b, 4);
    peer::MoeFfw<float>::Cache cache;
    layer.forward(params, random_matrix<float>(b, 4, 2), y, cache, peer::Mode::kTrain);
    const auto routes = routes_of<float>(cache);
    for (Index t = 0; t < b; ++t) {
      const auto& r = routes[static_cast<std::size_t>(t)];
      if (routing == peer::MoeRouting::kTokenChoice) {
        ASSERT_EQ(r.size(), 2u);
        EXPECT_EQ(r[0].first, 0);
        EXPECT_EQ(r[1].first, 1);
        EXPECT_FLOAT_EQ(static_cast<float>(r[0].second), 0.5f);
      } else {
        const Index cap = c.capacity(b);  // ceil(9 * 2 / 6) = 3
        EXPECT_EQ(cap, 3);
        EXPECT_EQ(static_cast<Index>(r.size()), t < cap ? 6 : 0) << "token " << t;
      }
    }
    // Uniform P_e = 1/E makes E sum_e f_e P_e = 1 whatever f is (token choice sends everything to 0 and 1).
    EXPECT_NEAR(cache.balance, 1.0f, 1e-6f);
  }
}

// ---- Gradients -------------------------------------------------------------------------------------

void run_gradient_check(const std::string& name, const peer::MoeConfig& c, bool use_mask) {
  SCOPED_TRACE(name);
  peer::MoeFfw<double> layer(c);
  auto params = layer.make_parameters(5);
  randomize(layer, params, 31);
  const Index b = 9;
  Mat<double> x = random_matrix<double>(b, c.model_dim, 8);
  const Mat<double> r = random_matrix<double>(b, c.model_dim, 9);
  peer::RowMask mask = peer::RowMask::Constant(b, true);
  mask[1] = mask[6] = false;
  const peer::RowMask* m = use_mask ? &mask : nullptr;

  peer::MoeFfw<double>::Cache cache, probe;
  Mat<double> y(b, c.model_dim);
  layer.forward(params, x, y, cache, peer::Mode::kTrain, m);
  ASSERT_GT(naive_moe(c, params, x, m).margin, 1e-4) << "the data must keep selections away from ties";
  if (c.load_balance_weight > 0) {
    EXPECT_GT(cache.aux_loss, 0.0);
  }
  auto grads = layer.make_gradients();
  Mat<double> dx = Mat<double>::Zero(b, c.model_dim);
  layer.backward(params, cache, r, dx, grads);

  // L = <y, R> + L_aux: backward's dy is R and it adds the balance term's gradient itself.
  auto loss = [&] {
    Mat<double> yp(b, c.model_dim);
    layer.forward(params, x, yp, probe, peer::Mode::kTrain, m);
    return (yp.array() * r.array()).sum() + probe.aux_loss;
  };
  auto same = [&] { return probe.expert == cache.expert && probe.token == cache.token; };
  GradCheckStats st = check_entries("x", x.data(), x.size(), [&](Index e) { return dx.data()[e]; }, loss, same);
  EXPECT_GE(st.checked, x.size() * 4 / 5) << "x";
  for (const auto& spec : layer.layout().dense()) {
    auto value = params.find(spec.name);
    auto grad = grads.find_dense(spec.name);
    st = check_entries(spec.name, value.data(), value.size(), [&](Index e) { return grad.data()[e]; }, loss, same);
    EXPECT_GE(st.checked, value.size() * 4 / 5) << spec.name;
  }
}

TEST(MoeGradients, TokenChoiceWithAndWithoutBalanceLoss) {
  for (double w : {0.0, 0.7}) {
    for (auto norm : {peer::MoeGateNorm::kRenormalize, peer::MoeGateNorm::kNone}) {
      peer::MoeConfig c = small_moe(peer::MoeRouting::kTokenChoice, 5, 4, 3, 2);
      c.load_balance_weight = w;
      c.gate_norm = norm;
      run_gradient_check(std::string("token choice, gates ") + peer::to_string(norm) + ", w = " + std::to_string(w), c, false);
    }
  }
  peer::MoeConfig masked = small_moe(peer::MoeRouting::kTokenChoice, 5, 4, 3, 1);
  masked.load_balance_weight = 0.4;
  masked.activation = peer::Activation::kGeluTanh;
  masked.bias = peer::Bias::kNone;
  run_gradient_check("token choice, top 1, mask, no bias", masked, true);
}

TEST(MoeGradients, ExpertChoiceWithAndWithoutBalanceLoss) {
  for (double w : {0.0, 0.7}) {
    peer::MoeConfig c = small_moe(peer::MoeRouting::kExpertChoice, 5, 4, 3, 2);
    c.load_balance_weight = w;
    run_gradient_check("expert choice, w = " + std::to_string(w), c, false);
  }
  peer::MoeConfig masked = small_moe(peer::MoeRouting::kExpertChoice, 5, 4, 3, 1);
  masked.capacity_factor = 1.5;
  masked.load_balance_weight = 0.4;
  masked.activation = peer::Activation::kSiLU;
  run_gradient_check("expert choice, c = 1.5, mask", masked, true);
}

// ---- Contracts -------------------------------------------------------------------------------------

TEST(MoeContracts, ForwardAssignsAndBackwardAddsExactlyOnce) {
  for (auto routing : {peer::MoeRouting::kTokenChoice, peer::MoeRouting::kExpertChoice}) {
    SCOPED_TRACE(peer::to_string(routing));
    peer::MoeConfig c = small_moe(routing, 8, 6, 5, 2);
    c.load_balance_weight = 0.1;
    peer::MoeFfw<float> layer(c);
    auto params = layer.make_parameters(9);
    randomize(layer, params, 3);
    const Index b = 11;
    const Mat<float> x = random_matrix<float>(b, 8, 1);
    const Mat<float> dy = random_matrix<float>(b, 8, 2);
    peer::MoeFfw<float>::Cache cache;

    Mat<float> y(b, 8);
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    auto delta = layer.make_gradients();
    Mat<float> dx_delta = Mat<float>::Zero(b, 8);
    layer.backward(params, cache, dy, dx_delta, delta);

    Mat<float> y2 = Mat<float>::Constant(b, 8, std::numeric_limits<float>::quiet_NaN());
    layer.forward(params, x, y2, cache, peer::Mode::kTrain);
    EXPECT_TRUE(y2.allFinite()) << "forward must assign every output";
    EXPECT_EQ(y2, y);
    auto grads = layer.make_gradients();
    std::fill(grads.dense_data(), grads.dense_data() + layer.layout().dense_size(), 9.0f);
    Mat<float> dx = Mat<float>::Constant(b, 8, 9.0f);
    layer.backward(params, cache, dy, dx, grads);
    EXPECT_EQ(dx, (dx_delta.array() + 9.0f).matrix()) << "dx must end as 9 + delta";
    for (const auto& spec : layer.layout().dense()) {
      EXPECT_GT(delta.find_dense(spec.name).cwiseAbs().maxCoeff(), 0.0f) << spec.name;
      EXPECT_EQ(grads.find_dense(spec.name), (delta.find_dense(spec.name).array() + 9.0f).matrix()) << spec.name;
    }

    // y may be x itself.
    Mat<float> inplace = x;
    layer.forward(params, inplace, inplace, cache, peer::Mode::kTrain);
    EXPECT_EQ(inplace, y);

    // Skipping dx leaves every parameter gradient unchanged.
    auto skipped = layer.make_gradients();
    Mat<float> none;
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    layer.backward(params, cache, dy, none, skipped);
    for (const auto& spec : layer.layout().dense()) {
      EXPECT_EQ(skipped.find_dense(spec.name), delta.find_dense(spec.name)) << spec.name;
    }
  }
}

struct Outputs {
  Mat<float> y, dx;
  std::vector<float> dense;
  float aux = 0;
  int team = 0;  // threads the parallel loop really had
};

Outputs run_with_threads(int threads, peer::MoeRouting routing) {
  ThreadScope scope(threads);
  peer::MoeConfig c = small_moe(routing, 40, 16, 24, 2);
  c.load_balance_weight = 0.01;
  peer::MoeFfw<float> layer(c);
  auto params = layer.make_parameters(5);
  const Index b = 333;
  const Mat<float> x = random_matrix<float>(b, 40, 3);
  peer::RowMask mask = peer::RowMask::Constant(b, true);
  for (Index t = 0; t < b; t += 7) mask[t] = false;
  Outputs out;
  out.y.resize(b, 40);
  peer::MoeFfw<float>::Cache cache;
  layer.forward(params, x, out.y, cache, peer::Mode::kTrain, &mask);
  auto grads = layer.make_gradients();
  out.dx = Mat<float>::Zero(b, 40);
  layer.backward(params, cache, random_matrix<float>(b, 40, 4), out.dx, grads);
  layer.backward(params, cache, random_matrix<float>(b, 40, 5), out.dx, grads);
  out.dense.assign(grads.dense_data(), grads.dense_data() + layer.layout().dense_size());
  out.aux = cache.aux_loss;
  out.team = library_team_size();
  return out;
}

TEST(MoeContracts, BitwiseIdenticalForOneTwoAndFourThreads) {
  for (auto routing : {peer::MoeRouting::kTokenChoice, peer::MoeRouting::kExpertChoice}) {
    const Outputs one = run_with_threads(1, routing);
    for (int threads : {2, 4}) {
      const Outputs many = run_with_threads(threads, routing);
      const std::string label = std::to_string(threads) + " threads, " + peer::to_string(routing);
#if defined(_OPENMP)
      ASSERT_EQ(many.team, threads) << label << ": the parallel loop must really run on that many threads";
#endif
      EXPECT_TRUE(same_bits(one.y, many.y)) << label;
      EXPECT_TRUE(same_bits(one.dx, many.dx)) << label;
      EXPECT_TRUE(same_bits(one.dense, many.dense)) << label;
      EXPECT_TRUE(same_bits(one.aux, many.aux)) << label;
    }
  }
#if !defined(_OPENMP)
  GTEST_SKIP() << "built without OpenMP: only one thread exists";
#endif
}

TEST(MoeContracts, EveryInvalidConfigurationIsRejectedWithItsRule) {
  auto bad = [](auto mutate, const std::string& text) {
    peer::MoeConfig c = small_moe(peer::MoeRouting::kTokenChoice);
    mutate(c);
    expect_error<std::invalid_argument>([&] { peer::MoeFfw<float> layer(c); }, text);
  };
  using C = peer::MoeConfig;
  bad([](C& c) { c.model_dim = 0; }, "MoeConfig.model_dim = 0 must be > 0");
  bad([](C& c) { c.model_dim = Index{1} << 25; }, "MoeConfig.model_dim = 33554432 must be <= 2^24");
  bad([](C& c) { c.num_experts = -2; }, "MoeConfig.num_experts = -2 must be > 0");
  bad([](C& c) { c.num_experts = Index{1} << 31; }, "MoeConfig.num_experts = 2147483648 must be < 2^31");
  bad([](C& c) { c.expert_hidden = 0; }, "MoeConfig.expert_hidden = 0 must be > 0");
  bad([](C& c) { c.expert_hidden = Index{1} << 25; }, "MoeConfig.expert_hidden = 33554432 must be <= 2^24");
  bad([](C& c) { c.num_experts = Index{1} << 30; c.expert_hidden = Index{1} << 10; c.model_dim = Index{1} << 10; },
      "MoeConfig.num_experts * expert_hidden * model_dim = 1.1259e+15 must be <= 2^46");
  bad([](C& c) { c.top_k = 0; }, "MoeConfig.top_k = 0 must be > 0");
  bad([](C& c) { c.top_k = 6; }, "MoeConfig.top_k = 6 must be <= num_experts = 5");
  bad([](C& c) { c.capacity_factor = 0; }, "MoeConfig.capacity_factor = 0 must be finite and > 0");
  bad([](C& c) { c.capacity_factor = std::numeric_limits<double>::infinity(); }, "MoeConfig.capacity_factor = inf must be finite and > 0");
  bad([](C& c) { c.load_balance_weight = -0.5; }, "MoeConfig.load_balance_weight = -0.5 must be finite and >= 0");
  bad([](C& c) { c.load_balance_weight = std::nan(""); }, "MoeConfig.load_balance_weight = nan must be finite and >= 0");
  EXPECT_NO_THROW(peer::MoeConfig().validate());
  EXPECT_THROW(peer::moe_routing_from_string("switch"), std::invalid_argument);
  EXPECT_THROW(peer::moe_gate_norm_from_string("sum"), std::invalid_argument);
  EXPECT_EQ(peer::moe_routing_from_string("expert_choice"), peer::MoeRouting::kExpertChoice);
  EXPECT_EQ(peer::moe_gate_norm_from_string("none"), peer::MoeGateNorm::kNone);
}

TEST(MoeContracts, EveryShapeAndStateErrorIsRejected) {
  const peer::MoeConfig c = small_moe(peer::MoeRouting::kTokenChoice);
  peer::MoeFfw<float> layer(c);
  auto params = layer.make_parameters(1);
  peer::MoeFfw<float>::Cache cache;
  Mat<float> x = random_matrix<float>(7, 6, 1), y(7, 6);
  Mat<float> x_bad = random_matrix<float>(7, 5, 1), y_bad(6, 6);
  auto grads = layer.make_gradients();
  expect_error<std::invalid_argument>([&] { layer.backward(params, cache, y, x, grads); }, "MoeFfw::backward: the cache holds no forward pass");
  expect_error<std::invalid_argument>([&] { layer.forward(params, x_bad, y, cache, peer::Mode::kTrain); }, "x has shape [7, 5] but must be [7, 6]");
  expect_error<std::invalid_argument>([&] { layer.forward(params, x, y_bad, cache, peer::Mode::kTrain); }, "y has shape [6, 6] but must be [7, 6]");
  peer::RowMask mask = peer::RowMask::Constant(5, true);
  expect_error<std::invalid_argument>([&] { layer.forward(params, x, y, cache, peer::Mode::kTrain, &mask); },
                                      "row mask size = 5 must equal the batch size 7");
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  Mat<float> dy_bad(7, 4), dx_bad(3, 6);
  expect_error<std::invalid_argument>([&] { layer.backward(params, cache, dy_bad, x, grads); }, "dy has shape [7, 4] but must be [7, 6]");
  expect_error<std::invalid_argument>([&] { layer.backward(params, cache, y, dx_bad, grads); }, "dx has shape [3, 6] but must be [7, 6]");
  peer::MoeConfig other = c;
  other.expert_hidden = 5;
  peer::MoeFfw<float> other_layer(other);
  auto other_params = other_layer.make_parameters(1);
  auto other_grads = other_layer.make_gradients();
  expect_error<std::invalid_argument>([&] { layer.forward(other_params, x, y, cache, peer::Mode::kTrain); }, "params were made for a different layout");
  expect_error<std::invalid_argument>([&] { layer.backward(params, cache, y, x, other_grads); }, "grads were made for a different layout");
  expect_error<std::invalid_argument>([&] { layer.initialize(other_params, 1); }, "params were made for a different layout");
  x(3, 4) = std::numeric_limits<float>::quiet_NaN();
  expect_error<std::domain_error>([&] { layer.forward(params, x, y, cache, peer::Mode::kTrain); }, "x has a non-finite value nan at [3, 4]");
  EXPECT_TRUE(cache.ready) << "input checks run before the cache is touched: it still holds the last forward";
  x(3, 4) = 0.5f;
  params.find("moe.router.weight")(2, 1) = std::numeric_limits<float>::infinity();
  expect_error<std::domain_error>([&] { layer.forward(params, x, y, cache, peer::Mode::kTrain); }, "router logits has a non-finite value");
  EXPECT_FALSE(cache.ready) << "a forward that failed half way must not leave a usable cache";
  expect_error<std::invalid_argument>([&] { layer.backward(params, cache, y, x, grads); }, "the cache holds no forward pass");
}

TEST(MoeContracts, AnEmptyBatchIsANoOp) {
  for (auto routing : {peer::MoeRouting::kTokenChoice, peer::MoeRouting::kExpertChoice}) {
    peer::MoeConfig c = small_moe(routing);
    c.load_balance_weight = 0.5;
    peer::MoeFfw<float> layer(c);
    auto params = layer.make_parameters(1);
    peer::MoeFfw<float>::Cache cache;
    Mat<float> x(0, 6), y(0, 6), dx(0, 6);
    layer.forward(params, x, y, cache, peer::Mode::kTrain);
    EXPECT_EQ(cache.assignments(), 0);
    EXPECT_EQ(cache.aux_loss, 0.0f);
    auto grads = layer.make_gradients();
    layer.backward(params, cache, y, dx, grads);
    for (Index i = 0; i < layer.layout().dense_size(); ++i) ASSERT_EQ(grads.dense_data()[i], 0.0f);
  }
}

// ---- Configuration: defaults, fields, FLOP and parameter counts ------------------------------------

TEST(MoeConfig, DefaultsAndFields) {
  const peer::MoeConfig c;
  EXPECT_EQ(c.model_dim, 256);
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.expert_hidden, 512);
  EXPECT_EQ(c.top_k, 2);
  EXPECT_EQ(c.routing, peer::MoeRouting::kTokenChoice);
  EXPECT_EQ(c.gate_norm, peer::MoeGateNorm::kRenormalize);
  EXPECT_EQ(c.activation, peer::Activation::kGelu);
  EXPECT_EQ(c.load_balance_weight, 0.0);
  // isoFLOP with the default dense FFW (D -> 4 D -> D) in the experts.
  EXPECT_EQ(c.forward_flops_per_token() - 2.0 * 256 * 128, peer::DenseFfwConfig{}.forward_flops_per_token());
  // The figures docs/moe.md quotes.
  EXPECT_EQ(c.forward_flops_per_token(), 1114112.0);
  EXPECT_EQ(c.total_parameters(), 33685504);
  EXPECT_EQ(c.active_parameters_per_token(), 558592.0);
  const auto fields = c.to_fields();
  ASSERT_EQ(fields.size(), 10u);
  EXPECT_EQ(fields[4], (std::pair<std::string, std::string>{"routing", "token_choice"}));
  EXPECT_EQ(fields[5], (std::pair<std::string, std::string>{"capacity_factor", "1"}));
  peer::MoeConfig other = c;
  EXPECT_EQ(c.first_difference(other), "");
  other.capacity_factor = 0.1;
  EXPECT_EQ(c.first_difference(other), "capacity_factor: 1 vs 0.10000000000000001");
}

TEST(MoeConfig, FlopAndParameterFormulasMatchHandCounts) {
  // D = 4, E = 3, F = 5, k = 2, biases.
  peer::MoeConfig c = small_moe(peer::MoeRouting::kTokenChoice, 4, 3, 5, 2);
  // router 3 * 4 = 12; experts 3 * (5 * 4 + 4 * 5) = 120; biases 3 * (5 + 4) = 27.
  EXPECT_EQ(c.total_parameters(), 159);
  EXPECT_EQ(peer::MoeFfw<float>(c).layout().num_parameters(), 159);
  EXPECT_EQ(c.active_parameters_per_token(), 12 + 2 * (40 + 9));  // 110
  EXPECT_EQ(c.parameter_bytes_per_token(), 440);
  EXPECT_EQ(c.parameter_bytes_per_token(8), 880);
  // router 2 * 4 * 3 = 24; two experts of 2 * 4 * 5 (up) + 2 * 5 * 4 (down) = 80 each.
  EXPECT_EQ(c.forward_flops_per_token(), 24 + 160);
  EXPECT_EQ(c.backward_flops_per_token(), 2 * 184);
  // The layer reports the same, with its own scalar size.
  const peer::MoeFfw<double> layer(c);
  EXPECT_EQ(layer.total_parameters(), 159);
  EXPECT_EQ(layer.active_parameters_per_token(), 110);
  EXPECT_EQ(layer.forward_flops_per_token(), 184);
  EXPECT_EQ(layer.backward_flops_per_token(), 368);
  EXPECT_EQ(layer.parameter_bytes_per_token(), 880);
  c.bias = peer::Bias::kNone;
  EXPECT_EQ(c.total_parameters(), 132);
  EXPECT_EQ(peer::MoeFfw<double>(c).layout().num_parameters(), 132);
  EXPECT_EQ(c.active_parameters_per_token(), 12 + 2 * 40);
  // Expert choice with c = 1.5: 3 experts per token on average.
  c.bias = peer::Bias::kLearned;
  c.routing = peer::MoeRouting::kExpertChoice;
  c.capacity_factor = 1.5;
  EXPECT_EQ(c.experts_per_token(), 3.0);
  EXPECT_EQ(c.forward_flops_per_token(), 24 + 240);
  EXPECT_EQ(c.active_parameters_per_token(), 12 + 3 * 49);
  // C = min(B, ceil(c B k / E)).
  EXPECT_EQ(c.capacity(10), 10);  // ceil(1.5 * 10 * 2 / 3) = 10
  EXPECT_EQ(c.capacity(7), 7);    // 7 exactly
  c.capacity_factor = 1.0;
  EXPECT_EQ(c.capacity(7), 5);    // ceil(14 / 3)
  EXPECT_EQ(c.capacity(1), 1);
  EXPECT_EQ(c.capacity(0), 0);
  c.capacity_factor = 100.0;
  EXPECT_EQ(c.capacity(4), 4);    // capped at B
}

}  // namespace
