// SPDX-License-Identifier: MIT
#ifndef PEER_PEER_HPP
#define PEER_PEER_HPP

/// \file
/// Umbrella header: everything a user of PEER layers needs. (Internals, in peer::detail, come in through the
/// headers that use them; peer/testing/gradient_check.hpp is included on its own.)

#include "peer/version.hpp"

#include "peer/core/aligned_buffer.hpp"
#include "peer/core/error.hpp"
#include "peer/core/fields.hpp"
#include "peer/core/gradients.hpp"
#include "peer/core/parallel.hpp"
#include "peer/core/parameter_layout.hpp"
#include "peer/core/parameters.hpp"
#include "peer/core/random.hpp"
#include "peer/core/row_sparse.hpp"
#include "peer/core/row_table.hpp"
#include "peer/core/types.hpp"

#include "peer/nn/activation.hpp"
#include "peer/nn/batch_norm.hpp"
#include "peer/nn/layer_norm.hpp"
#include "peer/nn/linear.hpp"
#include "peer/nn/query_network.hpp"

#include "peer/retrieval/brute_force.hpp"
#include "peer/retrieval/product_keys.hpp"
#include "peer/retrieval/top_k.hpp"

#include "peer/experts/single_neuron_experts.hpp"
#include "peer/experts/value_memory.hpp"

#include "peer/layers/dense_ffw.hpp"
#include "peer/layers/moe.hpp"
#include "peer/layers/moe_config.hpp"
#include "peer/layers/expert_stats.hpp"
#include "peer/layers/gating.hpp"
#include "peer/layers/peer_config.hpp"
#include "peer/layers/peer_layer.hpp"
#include "peer/layers/pool_growth.hpp"
#include "peer/layers/product_key_layer.hpp"
#include "peer/layers/product_key_memory.hpp"

#include "peer/model/feed_forward.hpp"
#include "peer/model/model_layout.hpp"
#include "peer/model/raw_views.hpp"

#include "peer/optim/adam.hpp"
#include "peer/optim/optimizer.hpp"
#include "peer/optim/optimizer_core.hpp"
#include "peer/optim/schedule.hpp"
#include "peer/optim/sgd.hpp"

// io
#include "peer/io/checkpoint.hpp"
#include "peer/io/mapped_file.hpp"
#include "peer/io/mapped_parameters.hpp"
#include "peer/io/maps/peer_pytorch.hpp"
#include "peer/io/maps/pkm_pytorch.hpp"
#include "peer/io/maps/torch_map.hpp"
#include "peer/io/sharded_checkpoint.hpp"
#include "peer/io/training_checkpoint.hpp"

#endif  // PEER_PEER_HPP
