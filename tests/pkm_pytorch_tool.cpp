// The C++ side of the product-key-memory cross-language test (tests/python/test_pkm_pytorch.py):
//   pkm_pytorch_tool WEIGHTS INPUTS OUT
// WEIGHTS: a PKM's state_dict in safetensors (its names and shapes), with its constructor arguments in the
// metadata (dim, heads, num_keys, topk, dim_head, non_competitive_gates). INPUTS: x [B, D] and dy [B, D].
// The weights come in through the map and the preset (peer/io/maps/pkm_pytorch_file.hpp) in double; one
// forward and backward of our ProductKeyMemory; OUT gets y, dx, every gradient in product-key-memory's
// layout ("grad." + its name) and the weights written back through the map ("weights." + its name).
#include <peer/io/maps/pkm_pytorch_file.hpp>
#include <peer/layers/product_key_memory.hpp>

#include <cstdio>
#include <exception>
#include <map>
#include <string>

namespace {

peer::Index field(const peer::SafetensorsFile& file, const std::string& key) {
  const auto it = file.metadata().find(key);
  if (it == file.metadata().end()) throw std::runtime_error("metadata '" + key + "' is missing");
  return static_cast<peer::Index>(std::stoll(it->second));
}

int run(const std::string& weights_path, const std::string& inputs_path, const std::string& out_path) {
  const auto weights = peer::SafetensorsFile::open(weights_path);
  peer::PkmPytorchConfig t;
  t.dim = field(weights, "dim");
  t.heads = field(weights, "heads");
  t.num_keys = field(weights, "num_keys");
  t.topk = field(weights, "topk");
  t.dim_head = field(weights, "dim_head");
  t.non_competitive_gates = field(weights, "non_competitive_gates") != 0;
  peer::ProductKeyMemory<double> layer(peer::pkm_pytorch_config(t));
  peer::Parameters<double> params = layer.make_parameters(0);
  peer::import_pkm_pytorch(t, weights, params);

  const auto inputs = peer::SafetensorsFile::open(inputs_path);
  const peer::RowMatrix<double> x = inputs.matrix<double>("x", -1, t.dim);
  const peer::RowMatrix<double> dy = inputs.matrix<double>("dy", x.rows(), t.dim);
  peer::RowMatrix<double> y(x.rows(), t.dim), dx = peer::RowMatrix<double>::Zero(x.rows(), t.dim);
  peer::ProductKeyMemory<double>::Cache cache;
  auto grads = layer.make_gradients();
  layer.forward(params, x, y, cache, peer::Mode::kTrain);
  layer.backward(params, cache, dy, dx, grads);

  peer::SafetensorsWriter out;
  out.add_matrix<double>("y", y);
  out.add_matrix<double>("dx", dx);
  std::map<std::string, peer::RowMatrix<double>> g;
  std::map<std::string, peer::MatrixMap<double>> views;
  for (const auto& spec : peer::pkm_pytorch_tensors(t)) {
    auto& m = g[spec.name] = peer::RowMatrix<double>(spec.rows, spec.cols);
    views.emplace(spec.name, peer::MatrixMap<double>(m.data(), m.rows(), m.cols(), Eigen::OuterStride<>(m.cols())));
  }
  peer::export_pkm_pytorch_gradients(t, grads, views);
  for (const auto& spec : peer::pkm_pytorch_tensors(t)) out.add("grad." + spec.name, g[spec.name].data(), spec.shape);
  peer::add_pkm_pytorch(out, t, params, "weights.");
  out.save(out_path);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: pkm_pytorch_tool WEIGHTS INPUTS OUT\n");
    return 2;
  }
  try {
    return run(argv[1], argv[2], argv[3]);
  } catch (const std::exception& e) {
    std::printf("rejected: %s\n", e.what());
    return 1;
  }
}
