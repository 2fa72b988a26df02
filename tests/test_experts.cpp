// The fused single-neuron expert kernels, used on their own with ids and gates from a custom router.
#include "test_util.hpp"

namespace {

using namespace peer_test;

template <typename S>
struct ExpertSetup {
  peer::SingleNeuronExperts<S> experts;
  peer::ParameterLayout layout{static_cast<Index>(sizeof(S))};
  peer::Parameters<S> params;

  ExpertSetup(Index n_experts, Index d, peer::Activation act)
      : experts(peer::ExpertPoolConfig{n_experts, d, act}) {
    experts.register_parameters(layout, "experts");
    params = peer::Parameters<S>(layout);
    experts.initialize(params, 3);
  }
};

// Router of the tests: random ids with deliberate repeats inside a token, random gates.
peer::IdMatrix random_ids(Index b, Index slots, Index n_experts, unsigned seed) {
  std::mt19937 gen(seed);
  peer::IdMatrix ids(b, slots);
  for (Index i = 0; i < ids.size(); ++i) ids.data()[i] = static_cast<peer::ExpertId>(gen() % static_cast<unsigned>(n_experts));
  for (Index t = 0; t < b; t += 2) ids(t, slots - 1) = ids(t, 0);  // the same expert twice in one token
  return ids;
}

template <typename S>
void forward_matches_naive(peer::Activation act) {
  ExpertSetup<S> setup(50, 12, act);
  const Mat<S> x = random_matrix<S>(9, 12, 1);
  const peer::IdMatrix ids = random_ids(9, 7, 50, 2);
  const Mat<S> gates = random_matrix<S>(9, 7, 3);
  Mat<S> y(9, 12), z(9, 7);
  y.setConstant(std::numeric_limits<S>::quiet_NaN());
  setup.experts.forward(setup.params, x, ids, gates, y, z);
  const auto table = setup.params.find("experts");
  for (Index t = 0; t < 9; ++t) {
    for (Index i = 0; i < 12; ++i) {
      double expect = 0;
      for (Index s = 0; s < 7; ++s) {
        double zz = 0;
        for (Index l = 0; l < 12; ++l) zz += static_cast<double>(table(ids(t, s), l)) * static_cast<double>(x(t, l));
        expect += static_cast<double>(gates(t, s)) * peer::activate(act, zz) * static_cast<double>(table(ids(t, s), 12 + i));
      }
      const double tol = std::is_same<S, float>::value ? 1e-5 : 1e-13;
      EXPECT_NEAR(static_cast<double>(y(t, i)), expect, tol);
    }
  }
}

TEST(SingleNeuronExperts, ForwardMatchesNaiveLoopsForEveryActivation) {
  for (auto act : {peer::Activation::kReLU, peer::Activation::kGelu, peer::Activation::kGeluTanh,
                   peer::Activation::kSiLU}) {
    forward_matches_naive<float>(act);
    forward_matches_naive<double>(act);
  }
}

TEST(SingleNeuronExperts, BackwardMatchesCentralDifferencesAndIsRowSparse) {
  for (auto act : {peer::Activation::kReLU, peer::Activation::kGelu, peer::Activation::kGeluTanh,
                   peer::Activation::kSiLU}) {
    ExpertSetup<double> setup(40, 6, act);
    Mat<double> x = random_matrix<double>(5, 6, 4);
    const peer::IdMatrix ids = random_ids(5, 4, 40, 5);
    Mat<double> gates = random_matrix<double>(5, 4, 6);
    const Mat<double> r = random_matrix<double>(5, 6, 7);
    Mat<double> y(5, 6), z(5, 4);
    setup.experts.forward(setup.params, x, ids, gates, y, z);
    peer::Gradients<double> grads(setup.layout);
    typename peer::SingleNeuronExperts<double>::Workspace ws;
    Mat<double> dx = Mat<double>::Zero(5, 6), dgates(5, 4);
    setup.experts.backward(setup.params, x, ids, gates, z, r, dx, dgates, grads, ws);
    auto loss = [&] {
      setup.experts.forward(setup.params, x, ids, gates, y, z);
      return (y.array() * r.array()).sum();
    };
    auto same = [] { return true; };
    check_entries("dx", x.data(), x.size(), [&](Index e) { return dx.data()[e]; }, loss, same);
    check_entries("dgates", gates.data(), gates.size(), [&](Index e) { return dgates.data()[e]; }, loss, same);
    auto table = setup.params.find("experts");
    const auto& g = grads.find_table("experts");
    std::vector<peer::ExpertId> touched(ids.data(), ids.data() + ids.size());
    std::sort(touched.begin(), touched.end());
    touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
    EXPECT_EQ(g.ids(), touched) << "each touched expert exactly once, ascending; untouched rows absent";
    check_entries("experts", table.data(), table.size(),
                  [&](Index e) {
                    const double* row = g.find(static_cast<peer::ExpertId>(e / 12));
                    return row == nullptr ? 0.0 : row[e % 12];
                  },
                  loss, same);
  }
}

// The kernels run two passes per token (all dots, then all axpys) for speed; the docs promise the results of
// the plain loop that does dot-then-axpy slot by slot, bit for bit. That loop, on the same row primitives:
// The table's row gradient as the backward sums it (each touched row from zero, its slots in (token, slot)
// order, du += dz x_t, dv += g sigma(z) dy_t) is returned as (ascending ids, rows).
template <typename S>
std::pair<std::vector<peer::ExpertId>, Mat<S>> one_pass_reference(
    const peer::RowTable<S>& table, peer::Activation act, Index d, const peer::ConstMatrixRef<S>& x,
    const peer::IdMatrix& ids, const Mat<S>& gates, const peer::ConstMatrixRef<S>& dy, Mat<S>& y, Mat<S>& z, Mat<S>& dx,
    Mat<S>& dgates) {
  Mat<S> coef_u(ids.rows(), ids.cols()), coef_v(ids.rows(), ids.cols());
  y.setZero();
  for (Index t = 0; t < x.rows(); ++t) {
    for (Index s = 0; s < ids.cols(); ++s) {
      z(t, s) = table.dot(ids(t, s), 0, x.row(t).data(), d);
      table.axpy(ids(t, s), d, gates(t, s) * peer::activate(act, z(t, s)), y.row(t).data(), d);
    }
    for (Index s = 0; s < ids.cols(); ++s) {
      const S dh = table.dot(ids(t, s), d, dy.row(t).data(), d);
      const S dz = gates(t, s) * peer::activate_derivative(act, z(t, s)) * dh;
      dgates(t, s) = peer::activate(act, z(t, s)) * dh;
      coef_u(t, s) = dz;
      coef_v(t, s) = gates(t, s) * peer::activate(act, z(t, s));
      table.axpy(ids(t, s), 0, dz, dx.row(t).data(), d);
    }
  }
  std::vector<peer::ExpertId> touched(ids.data(), ids.data() + ids.size());
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  Mat<S> rows(static_cast<Index>(touched.size()), 2 * d);
  Mat<S> buffer(1, 2 * d);  // an aligned row, as the backward's own buffer
  for (std::size_t r = 0; r < touched.size(); ++r) {
    Eigen::Map<Eigen::Matrix<S, 1, Eigen::Dynamic>> row(buffer.data(), 2 * d);
    row.setZero();
    for (Index t = 0; t < ids.rows(); ++t) {
      for (Index s = 0; s < ids.cols(); ++s) {
        if (ids(t, s) != touched[r]) continue;
        row.head(d) += coef_u(t, s) * x.row(t);
        row.tail(d) += coef_v(t, s) * dy.row(t);
      }
    }
    rows.row(static_cast<Index>(r)) = row;
  }
  return {touched, rows};
}

template <typename S>
bool same_gradient(const peer::RowSparseGrad<S>& g, const std::pair<std::vector<peer::ExpertId>, Mat<S>>& ref) {
  return g.ids() == ref.first && same_bits(Mat<S>(g.values()), ref.second);
}

template <typename S>
void two_passes_equal_one_pass(peer::TableStorage storage) {
  const Index n = 300, d = 40, b = 37, slots = 19;  // d: two 16-lane blocks and a tail; b: several chunks
  peer::SingleNeuronExperts<S> experts(peer::ExpertPoolConfig{n, d, peer::Activation::kGelu, storage});
  peer::ParameterLayout layout{static_cast<Index>(sizeof(S))};
  experts.register_parameters(layout, "experts");
  peer::Parameters<S> params(layout);
  experts.initialize(params, 11);
  const Mat<S> x = random_matrix<S>(b, d, 12), dy = random_matrix<S>(b, d, 13), gates = random_matrix<S>(b, slots, 14);
  const peer::IdMatrix ids = random_ids(b, slots, n, 15);
  Mat<S> y(b, d), z(b, slots), dgates(b, slots), y_ref(b, d), z_ref(b, slots), dgates_ref(b, slots);
  Mat<S> dx = random_matrix<S>(b, d, 16), dx_ref = dx;  // dx is added to
  peer::Gradients<S> grads(layout);
  typename peer::SingleNeuronExperts<S>::Workspace ws;
  experts.forward(params, x, ids, gates, y, z);
  experts.backward(params, x, ids, gates, z, dy, dx, dgates, grads, ws);
  const auto grad_ref = one_pass_reference<S>(params.table(experts.table_handle()), peer::Activation::kGelu, d, x, ids,
                                              gates, dy, y_ref, z_ref, dx_ref, dgates_ref);
  EXPECT_TRUE(same_bits(y, y_ref));
  EXPECT_TRUE(same_bits(z, z_ref));
  EXPECT_TRUE(same_bits(dx, dx_ref));
  EXPECT_TRUE(same_bits(dgates, dgates_ref));
  EXPECT_TRUE(same_gradient(grads.table(experts.table_handle()), grad_ref));
  // Without dx (no rows): the same gate and row gradients.
  Mat<S> no_dx(0, d), dgates_alone(b, slots);
  grads.zero();
  experts.backward(params, x, ids, gates, z, dy, no_dx, dgates_alone, grads, ws);
  EXPECT_TRUE(same_bits(dgates_alone, dgates_ref));
  EXPECT_TRUE(same_gradient(grads.table(experts.table_handle()), grad_ref));
}

TEST(SingleNeuronExperts, TwoPassKernelsEqualTheOnePassLoopBitForBit) {
  two_passes_equal_one_pass<float>(peer::TableStorage::kNative);
  two_passes_equal_one_pass<float>(peer::TableStorage::kBFloat16);
  two_passes_equal_one_pass<double>(peer::TableStorage::kNative);
  two_passes_equal_one_pass<double>(peer::TableStorage::kBFloat16);
}

TEST(SingleNeuronExperts, RejectsIdsOutsideThePool) {
  ExpertSetup<float> setup(10, 4, peer::Activation::kGelu);
  const Mat<float> x = random_matrix<float>(2, 4, 1);
  peer::IdMatrix ids(2, 3);
  ids << 0, 1, 2, 3, 10, 4;
  const Mat<float> gates = random_matrix<float>(2, 3, 2);
  Mat<float> y(2, 4), z(2, 3);
  try {
    setup.experts.forward(setup.params, x, ids, gates, y, z);
    FAIL() << "id 10 accepted for a pool of 10";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("ids[1, 1] = 10 must be in [0, 10)"), std::string::npos) << e.what();
  }
}

}  // namespace
