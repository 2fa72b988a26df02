// Parity with lucidrains/PEER-pytorch 0.2.1: its weights imported through the map and the preset
// configuration reproduce its forward output and every gradient, in float (1e-5 x max|ref|) and in double
// (1e-12 x max|ref| against its float64 run), in both of its gate modes. The reference numbers are in
// tests/data/peer_pytorch_small (a copy of ../shared/reference/peer_pytorch_small; its README says what
// PEER-pytorch computes). Negative controls: a map that does not permute the query halves, or that shares
// one head's keys, must fail the comparison.
#include <peer/io/maps/peer_pytorch.hpp>
#include <peer/io/maps/peer_pytorch_file.hpp>
#include <peer/io/maps/pkm_pytorch.hpp>
#include <peer/layers/product_key_memory.hpp>
#include <peer/model/raw_views.hpp>

#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>

#include "test_util.hpp"

namespace {

using namespace peer_test;

const std::string kData = std::string(PEER_TEST_DATA_DIR) + "/peer_pytorch_small/";

template <typename T>
std::vector<T> read_raw(const std::string& file, std::size_t count) {
  std::ifstream in(kData + file, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + kData + file);
  std::vector<T> out(count);
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(count * sizeof(T)));
  if (static_cast<std::size_t>(in.gcount()) != count * sizeof(T)) throw std::runtime_error(file + " is too short");
  in.peek();
  if (!in.eof()) throw std::runtime_error(file + " is longer than expected");
  return out;
}

/// A [rows, cols] reference array in Scalar, from its .f32 or .f64 file.
template <typename Scalar>
Mat<Scalar> read_matrix(const std::string& file, Index rows, Index cols) {
  const std::size_t n = static_cast<std::size_t>(rows * cols);
  Mat<Scalar> m(rows, cols);
  if (file.size() > 4 && file.substr(file.size() - 4) == ".f64") {
    const auto v = read_raw<double>(file, n);
    for (std::size_t i = 0; i < n; ++i) m.data()[i] = static_cast<Scalar>(v[i]);
  } else {
    const auto v = read_raw<float>(file, n);
    for (std::size_t i = 0; i < n; ++i) m.data()[i] = static_cast<Scalar>(v[i]);
  }
  return m;
}

struct Case {
  std::string name;
  bool non_competing;
};

peer::PeerPytorchConfig torch_config(const Case& c) {
  peer::PeerPytorchConfig t;
  t.dim = 32;
  t.heads = 2;
  t.num_experts = 256;
  t.num_experts_per_head = 4;
  t.dim_key = 16;
  t.non_competing_scores = c.non_competing;
  return t;
}

/// Max |a - b| / max |ref|.
template <typename Scalar>
double scaled_error(const Mat<Scalar>& ours, const Mat<Scalar>& ref) {
  const double scale = std::max(1e-30, static_cast<double>(ref.cwiseAbs().maxCoeff()));
  return static_cast<double>((ours - ref).cwiseAbs().maxCoeff()) / scale;
}

struct Result {
  std::map<std::string, double> errors;  // per compared quantity
  bool same_experts = true;
};

/// How the weights come in: through the map, or through one of two wrong maps (negative controls).
enum class Import { kMap, kUnpermutedHalves, kSharedKeys };

template <typename Scalar>
Result run_case(const Case& c, Import import, const std::string& ref_suffix) {
  const peer::PeerPytorchConfig t = torch_config(c);
  peer::PeerConfig config = peer::peer_pytorch_config(t);
  if (import == Import::kSharedKeys) config.key_sharing = peer::KeySharing::kShared;
  peer::PeerLayer<Scalar> layer(config);
  peer::Parameters<Scalar> params(layer.layout());
  const Index h = t.heads, s = t.num_sub_keys(), dk = t.dim_key, d = t.dim, n = t.num_experts, b = 6;
  const Mat<Scalar> wq = read_matrix<Scalar>(c.name + "/param_w_query.f32", 2 * h * dk, d);
  const Mat<Scalar> keys = read_matrix<Scalar>(c.name + "/param_keys.f32", h * s * 2, dk);
  const Mat<Scalar> down = read_matrix<Scalar>(c.name + "/param_w_down.f32", n, d);
  const Mat<Scalar> up = read_matrix<Scalar>(c.name + "/param_w_up.f32", n, d);
  // As docs/pytorch.md shows it: views of the four tensors in their own layouts.
  std::map<std::string, peer::ConstMatrixMap<Scalar>> tensors{
      {"to_queries.0.weight", peer::rows_view(wq.data(), 2 * h * dk, d)},
      {"keys", peer::rows_view(keys.data(), h * s * 2, dk)},
      {"weight_down_embed.weight", peer::rows_view(down.data(), n, d)},
      {"weight_up_embed.weight", peer::rows_view(up.data(), n, d)}};
  if (import == Import::kSharedKeys) {
    // A wrong map: head 0's sub-keys for every head (the layer shares one set).
    peer::PeerLayer<Scalar> per_head(peer::peer_pytorch_config(t));
    peer::Parameters<Scalar> full(per_head.layout());
    peer::import_peer_pytorch(t, tensors, full);
    params.find("query.weight") = full.find("query.weight");
    params.find("sub_keys.left") = full.find("sub_keys.left").topRows(s);
    params.find("sub_keys.right") = full.find("sub_keys.right").topRows(s);
    params.find("experts") = full.find("experts");
  } else {
    peer::import_peer_pytorch(t, tensors, params);
    if (import == Import::kUnpermutedHalves) params.find("query.weight") = wq;  // a wrong map: rows as they are
  }
  const Mat<Scalar> x = read_matrix<Scalar>(c.name + "/input.f32", b, d);
  const Mat<Scalar> dy = read_matrix<Scalar>(c.name + "/grad_output.f32", b, d);
  Mat<Scalar> y(b, d), dx = Mat<Scalar>::Zero(b, d);
  typename peer::PeerLayer<Scalar>::Cache cache;
  auto grads = layer.make_gradients();
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  layer.backward(params, cache, dy, dx, grads);

  Result r;
  r.errors["output"] = scaled_error(y, read_matrix<Scalar>(c.name + "/output" + ref_suffix, b, d));
  r.errors["grad_input"] = scaled_error(dx, read_matrix<Scalar>(c.name + "/grad_input" + ref_suffix, b, d));
  if (import == Import::kMap) {
    Mat<Scalar> g_wq(2 * h * dk, d), g_keys(h * s * 2, dk), g_down(n, d), g_up(n, d);
    std::map<std::string, peer::MatrixMap<Scalar>> out{
        {"to_queries.0.weight", peer::MatrixMap<Scalar>(g_wq.data(), g_wq.rows(), d, Eigen::OuterStride<>(d))},
        {"keys", peer::MatrixMap<Scalar>(g_keys.data(), g_keys.rows(), dk, Eigen::OuterStride<>(dk))},
        {"weight_down_embed.weight", peer::MatrixMap<Scalar>(g_down.data(), n, d, Eigen::OuterStride<>(d))},
        {"weight_up_embed.weight", peer::MatrixMap<Scalar>(g_up.data(), n, d, Eigen::OuterStride<>(d))}};
    peer::export_peer_pytorch_gradients(t, grads, out);
    r.errors["grad_w_query"] = scaled_error(g_wq, read_matrix<Scalar>(c.name + "/grad_w_query" + ref_suffix, g_wq.rows(), d));
    r.errors["grad_keys"] = scaled_error(g_keys, read_matrix<Scalar>(c.name + "/grad_keys" + ref_suffix, g_keys.rows(), dk));
    r.errors["grad_w_down"] = scaled_error(g_down, read_matrix<Scalar>(c.name + "/grad_w_down" + ref_suffix, n, d));
    r.errors["grad_w_up"] = scaled_error(g_up, read_matrix<Scalar>(c.name + "/grad_w_up" + ref_suffix, n, d));
  }
  // The selected experts: expert_indices [B, T, H, k] (int64), the same set per token and head.
  const Index k = config.top_k;
  const auto ids = read_raw<std::int64_t>(c.name + "/expert_indices.i64", static_cast<std::size_t>(b * h * k));
  for (Index tok = 0; tok < b; ++tok) {
    for (Index head = 0; head < h; ++head) {
      std::vector<std::int64_t> theirs(ids.begin() + (tok * h + head) * k, ids.begin() + (tok * h + head + 1) * k), ours;
      for (Index j = 0; j < k; ++j) ours.push_back(cache.ids(tok, head * k + j));
      std::sort(theirs.begin(), theirs.end());
      std::sort(ours.begin(), ours.end());
      r.same_experts = r.same_experts && theirs == ours;
    }
  }
  return r;
}

const Case kCases[] = {{"softmax_top4", false}, {"relu_top1", true}};

TEST(PeerPytorchParity, FloatReproducesItsOutputAndEveryGradient) {
  for (const Case& c : kCases) {
    const Result r = run_case<float>(c, Import::kMap, ".f32");
    EXPECT_TRUE(r.same_experts) << c.name;
    EXPECT_EQ(r.errors.size(), 6u);
    for (const auto& e : r.errors) {
      std::cout << "  float  " << c.name << " " << e.first << ": max error / max|ref| = " << e.second << "\n";
      EXPECT_LE(e.second, 1e-5) << c.name << " " << e.first;
    }
  }
}

TEST(PeerPytorchParity, DoubleReproducesItsFloat64RunTo1e12) {
  for (const Case& c : kCases) {
    const Result r = run_case<double>(c, Import::kMap, "_f64.f64");
    EXPECT_TRUE(r.same_experts) << c.name;
    for (const auto& e : r.errors) {
      std::cout << "  double " << c.name << " " << e.first << ": max error / max|ref| = " << e.second << "\n";
      EXPECT_LE(e.second, 1e-12) << c.name << " " << e.first;
    }
  }
}

TEST(PeerPytorchParity, AWrongMapFails) {
  for (const Case& c : kCases) {
    for (Import wrong : {Import::kUnpermutedHalves, Import::kSharedKeys}) {
      const Result r = run_case<double>(c, wrong, "_f64.f64");
      EXPECT_GT(r.errors.at("output"), 1e-3) << c.name << ": a wrong map still matched";
    }
  }
}

TEST(PeerPytorchMap, PresetAndRoundTrip) {
  peer::PeerPytorchConfig t;
  t.dim = 16;
  t.heads = 3;
  t.num_experts = 64;
  t.num_experts_per_head = 4;
  t.dim_key = 4;
  const peer::PeerConfig relu = peer::peer_pytorch_config(t);  // its default: non-competing
  EXPECT_EQ(relu.top_k, 1);
  EXPECT_EQ(relu.sub_key_top_k, 4);
  EXPECT_EQ(relu.gating, peer::Gating::kReLU);
  EXPECT_EQ(relu.key_dim, 8);
  EXPECT_EQ(relu.key_sharing, peer::KeySharing::kPerHead);
  EXPECT_EQ(relu.query_norm, peer::QueryNorm::kNone);
  t.non_competing_scores = false;
  t.product_key_topk = 6;
  const peer::PeerConfig soft = peer::peer_pytorch_config(t);
  EXPECT_EQ(soft.top_k, 4);
  EXPECT_EQ(soft.sub_key_top_k, 6);
  EXPECT_EQ(soft.gating, peer::Gating::kSoftmax);
  // import then export gives back every PEER-pytorch tensor bit for bit.
  peer::PeerLayer<float> layer(soft);
  std::map<std::string, Mat<float>> data;
  std::map<std::string, peer::ConstMatrixMap<float>> in;
  unsigned seed = 1;
  for (const auto& spec : peer::peer_pytorch_tensors(t)) {
    data[spec.name] = random_matrix<float>(spec.rows, spec.cols, seed++);
    const auto& m = data[spec.name];
    in.emplace(spec.name, peer::ConstMatrixMap<float>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())));
  }
  peer::Parameters<float> params(layer.layout());
  peer::import_peer_pytorch(t, in, params);
  std::map<std::string, Mat<float>> back;
  std::map<std::string, peer::MatrixMap<float>> out;
  for (const auto& spec : peer::peer_pytorch_tensors(t)) {
    back[spec.name] = Mat<float>::Constant(spec.rows, spec.cols, -7.0f);
    auto& m = back[spec.name];
    out.emplace(spec.name, peer::MatrixMap<float>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())));
  }
  peer::export_peer_pytorch(t, params, out);
  for (const auto& spec : peer::peer_pytorch_tensors(t)) EXPECT_EQ(back[spec.name], data[spec.name]) << spec.name;
  // Into a bf16 expert table: every table value is the nearest bf16 of theirs (the dense tensors exact);
  // exported back, the table's tensors are those bf16 values widened, the others bit for bit.
  peer::PeerConfig soft16 = soft;
  soft16.expert_storage = peer::TableStorage::kBFloat16;
  peer::PeerLayer<float> layer16(soft16);
  peer::Parameters<float> params16(layer16.layout());
  peer::import_peer_pytorch(t, in, params16);
  const auto& table16 = params16.table(peer::TableHandle{0});
  const auto& table32 = params.table(peer::TableHandle{0});
  Eigen::RowVectorXf wide(table16.cols());
  bool nearest = true;
  for (peer::Index r = 0; r < table16.rows(); ++r) {
    table16.read_row(r, wide.data());
    for (peer::Index j = 0; j < table16.cols(); ++j) nearest = nearest && wide[j] == static_cast<float>(peer::bfloat16(table32.row(r)[j]));
  }
  EXPECT_TRUE(nearest) << "the bf16 table holds the nearest bf16 of every imported value";
  EXPECT_EQ(params16.find("query.weight"), params.find("query.weight"));
  std::map<std::string, Mat<float>> back16;
  std::map<std::string, peer::MatrixMap<float>> out16;
  for (const auto& spec : peer::peer_pytorch_tensors(t)) {
    back16[spec.name] = Mat<float>::Constant(spec.rows, spec.cols, -7.0f);
    auto& m = back16[spec.name];
    out16.emplace(spec.name, peer::MatrixMap<float>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())));
  }
  peer::export_peer_pytorch(t, params16, out16);
  for (const auto& spec : peer::peer_pytorch_tensors(t)) {
    const Mat<float> rounded = spec.name.rfind("weight_", 0) == 0 ? Mat<float>(data[spec.name].unaryExpr([](float v) { return static_cast<float>(peer::bfloat16(v)); }))
                                                                : data[spec.name];
    EXPECT_EQ(back16[spec.name], rounded) << spec.name;
  }
  // The head-outermost row order: their row p H dk + h dk + j is our row h Dk + p dk + j.
  EXPECT_EQ(params.find("query.weight").row(1 * 8 + 4 + 2), data["to_queries.0.weight"].row(1 * 12 + 1 * 4 + 2));
  // Shapes are checked, naming the tensor.
  const Mat<float> small = Mat<float>::Zero(3, 3);
  in.erase("keys");
  in.emplace("keys", peer::ConstMatrixMap<float>(small.data(), 3, 3, Eigen::OuterStride<>(3)));
  try {
    peer::import_peer_pytorch(t, in, params);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("PEER-pytorch tensor 'keys' is [3, 3] but must be [48, 4]"), std::string::npos) << e.what();
  }
  in.erase("keys");
  EXPECT_THROW(peer::import_peer_pytorch(t, in, params), std::invalid_argument);
  t.dim_key = 0;
  EXPECT_THROW(peer::peer_pytorch_config(t), std::invalid_argument);
}

TEST(PeerPytorchFile, ItsWeightsInASafetensorsFileReproduceItsOutput) {
  // The file PyTorch would write with safetensors.torch.save_file(model.state_dict()): its names under a
  // layer prefix, its shapes (keys [H, n, 2, dk]), F32, next to a tensor of another layer.
  const Case c = kCases[0];
  const peer::PeerPytorchConfig t = torch_config(c);
  const Index h = t.heads, s = t.num_sub_keys(), dk = t.dim_key, d = t.dim, n = t.num_experts;
  peer::SafetensorsWriter w;
  const auto wq = read_matrix<float>(c.name + "/param_w_query.f32", 2 * h * dk, d);
  const auto keys = read_matrix<float>(c.name + "/param_keys.f32", h * s * 2, dk);
  const auto down = read_matrix<float>(c.name + "/param_w_down.f32", n, d);
  const auto up = read_matrix<float>(c.name + "/param_w_up.f32", n, d);
  w.add("layers.0.ff.to_queries.0.weight", wq.data(), {2 * h * dk, d});
  w.add("layers.0.ff.keys", keys.data(), {h, s, 2, dk});
  w.add("layers.0.ff.weight_down_embed.weight", down.data(), {n, d});
  w.add("layers.0.ff.weight_up_embed.weight", up.data(), {n, d});
  w.add("layers.0.attn.unrelated", wq.data(), {2, 2});
  const auto file = peer::SafetensorsFile::from_bytes(w.to_bytes());
  peer::PeerLayer<float> layer(peer::peer_pytorch_config(t));
  peer::Parameters<float> params(layer.layout());
  peer::import_peer_pytorch(t, file, params, "layers.0.ff.");
  const Mat<float> x = read_matrix<float>(c.name + "/input.f32", 6, d);
  Mat<float> y(6, d);
  peer::PeerLayer<float>::Workspace ws;
  layer.infer(params, x, y, ws);
  EXPECT_LE(scaled_error(y, read_matrix<float>(c.name + "/output.f32", 6, d)), 1e-5);
  // Saved back under its names, the file holds its tensors bit for bit.
  peer::SafetensorsWriter back;
  peer::add_peer_pytorch(back, t, params, "ff.");
  const auto again = peer::SafetensorsFile::from_bytes(back.to_bytes());
  EXPECT_EQ(again.tensor("ff.keys").shape, (std::vector<std::int64_t>{h, s, 2, dk}));
  EXPECT_EQ(again.matrix<float>("ff.keys", h * s, 2 * dk), Eigen::Map<const Mat<float>>(keys.data(), h * s, 2 * dk));
  EXPECT_EQ(again.matrix<float>("ff.to_queries.0.weight"), wq);
  EXPECT_EQ(again.matrix<float>("ff.weight_up_embed.weight"), up);
  // BF16 weights convert on the way in: the output moves by about bf16's precision, not more.
  peer::SafetensorsWriter half;
  peer::add_peer_pytorch(half, t, params, "", peer::SafetensorsDType::kBF16);
  peer::Parameters<float> rounded(layer.layout());
  peer::import_peer_pytorch(t, peer::SafetensorsFile::from_bytes(half.to_bytes()), rounded);
  Mat<float> yb(6, d);
  layer.infer(rounded, x, yb, ws);
  const double err = scaled_error(yb, y);
  EXPECT_GT(err, 1e-6);
  EXPECT_LT(err, 0.1);
  // A missing tensor is named.
  try {
    peer::import_peer_pytorch(t, file, params, "layers.1.ff.");
    FAIL();
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("'layers.1.ff.to_queries.0.weight' is not in the file"), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(PeerPytorchConfigOf, InvertsThePresetAndRefusesOtherFunctions) {
  peer::PeerPytorchConfig t;
  t.dim = 8;
  t.heads = 2;
  t.num_experts = 36;
  t.dim_key = 4;
  t.num_experts_per_head = 3;
  for (bool non_competing : {true, false}) {
    t.non_competing_scores = non_competing;
    const peer::PeerConfig c = peer::peer_pytorch_config(t);
    const peer::PeerPytorchConfig back = peer::peer_pytorch_config_of(c);
    EXPECT_EQ(peer::peer_pytorch_config(back).first_difference(c), "") << non_competing;
    EXPECT_EQ(back.non_competing_scores, non_competing);
  }
  peer::PeerConfig batch_normed = peer::peer_pytorch_config(t);
  batch_normed.query_norm = peer::QueryNorm::kBatchNorm;
  try {
    peer::peer_pytorch_config_of(batch_normed);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("not one PEER-pytorch computes: query_norm: none vs batch_norm"), std::string::npos) << e.what();
  }
}

// lucidrains/product-key-memory: the preset and the map. Its function is checked across languages by
// tests/python/test_pkm_pytorch.py (ctest python.pkm_pytorch); here the pieces.
TEST(PkmPytorch, PresetMapRoundTripAndRefusals) {
  peer::PkmPytorchConfig t;
  t.dim = 8;
  t.heads = 2;
  t.num_keys = 5;
  t.topk = 3;
  t.dim_head = 4;
  const peer::PeerConfig c = peer::pkm_pytorch_config(t);
  EXPECT_EQ(c.num_experts, 25);
  EXPECT_EQ(c.key_dim, 8);
  EXPECT_EQ(c.top_k, 3);
  EXPECT_EQ(c.sub_key_top_k, 3);
  EXPECT_EQ(c.query_norm, peer::QueryNorm::kHalfLayerNorm);
  EXPECT_EQ(c.key_sharing, peer::KeySharing::kPerHead);
  EXPECT_EQ(c.query_bias, peer::Bias::kNone);
  EXPECT_EQ(c.gating, peer::Gating::kSoftmax);
  peer::PkmPytorchConfig relu = t;
  relu.non_competitive_gates = true;
  EXPECT_EQ(peer::pkm_pytorch_config(relu).gating, peer::Gating::kReLU);
  EXPECT_EQ(peer::pkm_pytorch_config(relu).top_k, 3);  // ReLU over all K scores, unlike PEER-pytorch's k = 1

  peer::ProductKeyMemory<double> layer(c);
  EXPECT_EQ(layer.layout().find("query.norm.weight").first >= 0, true);
  peer::Parameters<double> params = layer.make_parameters(3);
  EXPECT_EQ(params.find("query.norm.weight").cols(), 4);  // one affine map of dh, shared
  std::map<std::string, Mat<double>> data;
  std::map<std::string, peer::ConstMatrixMap<double>> in;
  unsigned seed = 11;
  for (const auto& spec : peer::pkm_pytorch_tensors(t)) {
    data[spec.name] = random_matrix<double>(spec.rows, spec.cols, seed++);
    const auto& m = data[spec.name];
    in.emplace(spec.name, peer::rows_view(m.data(), m.rows(), m.cols()));
  }
  peer::import_pkm_pytorch(t, in, params);
  EXPECT_EQ(params.find("values"), data["values.weight"]);
  EXPECT_EQ(params.find("query.norm.bias"), data["norm.bias"]);
  // Their row p H dh + h dh + j (p = 1, h = 1, j = 2) is our row h Dk + p dh + j; keys[h, i, p] is row h n + i.
  EXPECT_EQ(params.find("query.weight").row(1 * 8 + 4 + 2), data["to_queries.weight"].row(1 * 8 + 1 * 4 + 2));
  EXPECT_EQ(params.find("sub_keys.right").row(1 * 5 + 3), data["keys"].row((1 * 5 + 3) * 2 + 1));
  std::map<std::string, Mat<double>> back;
  std::map<std::string, peer::MatrixMap<double>> out;
  for (const auto& spec : peer::pkm_pytorch_tensors(t)) {
    auto& m = back[spec.name] = Mat<double>::Constant(spec.rows, spec.cols, -7.0);
    out.emplace(spec.name, peer::MatrixMap<double>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())));
  }
  peer::export_pkm_pytorch(t, params, out);
  for (const auto& spec : peer::pkm_pytorch_tensors(t)) EXPECT_EQ(back[spec.name], data[spec.name]) << spec.name;
  // Into a bf16 value table: the nearest bf16 of each value; exported back, those values widened.
  peer::PeerConfig c16 = c;
  c16.expert_storage = peer::TableStorage::kBFloat16;
  peer::ProductKeyMemory<double> layer16(c16);
  peer::Parameters<double> params16 = layer16.make_parameters(3);
  peer::import_pkm_pytorch(t, in, params16);
  peer::export_pkm_pytorch(t, params16, out);
  const Mat<double> rounded = data["values.weight"].unaryExpr([](double v) { return static_cast<double>(peer::bfloat16(static_cast<float>(v))); });
  EXPECT_EQ(back["values.weight"], rounded);
  EXPECT_NE(back["values.weight"], data["values.weight"]);
  EXPECT_EQ(back["to_queries.weight"], data["to_queries.weight"]);

  // A wrong shape is refused, naming the tensor, before anything is written.
  const std::size_t dense_size = static_cast<std::size_t>(layer.layout().dense_size());
  const std::vector<double> before(params.dense_data(), params.dense_data() + dense_size);
  const Mat<double> small = Mat<double>::Zero(1, 3);
  in.erase("norm.weight");
  in.emplace("norm.weight", peer::rows_view(small.data(), 1, 3));
  try {
    peer::import_pkm_pytorch(t, in, params);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("product-key-memory tensor 'norm.weight' is [1, 3] but must be [1, 4]"), std::string::npos) << e.what();
  }
  EXPECT_EQ(std::memcmp(params.dense_data(), before.data(), sizeof(double) * dense_size), 0);
  // A PEER layer's parameters have no "values": refused by name.
  peer::PeerLayer<double> peer_layer(c);
  auto wrong = peer_layer.make_parameters(1);
  in.erase("norm.weight");
  in.emplace("norm.weight", peer::rows_view(static_cast<const double*>(data["norm.weight"].data()), 1, 4));
  try {
    peer::import_pkm_pytorch(t, in, wrong);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("no tensor 'values'"), std::string::npos) << e.what();
  }

  // What is not mapped is refused, not computed differently.
  peer::PkmPytorchConfig batch_norm = t;
  batch_norm.use_layernorm = false;
  try {
    peer::pkm_pytorch_config(batch_norm);
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("use_layernorm = false is not mapped"), std::string::npos) << e.what();
  }
  peer::PkmPytorchConfig wide = t;
  wide.topk = 6;
  EXPECT_THROW(peer::pkm_pytorch_config(wide), std::invalid_argument);
}
