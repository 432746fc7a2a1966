// ModelWeights: a decoder's parameters in a backend's memory, in the fused
// layout the forward pass uses (see engine/backend.h):
//   qkv   = [q_proj; k_proj; v_proj]      [(Hq + 2 Hkv) D, H] (+ bias)
//   gate_up = [gate_proj; up_proj]        [2 I, H]
//
// LoadWeights reads a Hugging Face checkpoint through the memory map and
// copies each tensor once into the backend (converting dtype on the way).
// Every tensor is checked by name, shape and dtype; an error names the file
// and the tensor. DummyWeights fills the same layout with random values so
// real shapes can be measured without a checkpoint.
//
// Thread-safety: immutable after construction.
#ifndef STRATA_ENGINE_WEIGHTS_H_
#define STRATA_ENGINE_WEIGHTS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend.h"
#include "engine/model_config.h"
#include "engine/tensor_parallel.h"

namespace strata::engine {

struct LayerWeights {
  Tensor input_norm;  // [H]
  Tensor qkv;         // [(Hq + 2 Hkv) D, H]
  Tensor qkv_bias;    // [(Hq + 2 Hkv) D] or undefined
  Tensor o_proj;      // [H, Hq D]
  Tensor post_norm;   // [H]
  Tensor gate_up;     // [2 I, H]
  Tensor down;        // [H, I]
};

// Shapes with one rank; a tensor-parallel rank holds its share
// (LoadWeights with a TensorParallelShard).
struct ModelWeights {
  Tensor embed;  // [V, H]
  std::vector<LayerWeights> layers;
  Tensor final_norm;  // [H]
  Tensor lm_head;     // [V, H]; the same storage as embed when tied
  int64_t bytes = 0;  // total bytes in backend memory
};

absl::StatusOr<ModelWeights> LoadWeights(const ModelConfig& config, const std::string& model_dir,
                                         Backend& backend);
absl::StatusOr<ModelWeights> DummyWeights(const ModelConfig& config, Backend& backend,
                                          uint64_t seed);
// A tensor-parallel rank's share (engine/tensor_parallel.h), read straight
// from the memory map: its row blocks of the column-parallel projections,
// its column blocks of the row-parallel ones, its vocabulary rows of the
// embedding (plus a zero row that other ranks' ids read, with several
// ranks) and of the LM head; the norms whole. Dummy weights draw each
// rank's share at random.
absl::StatusOr<ModelWeights> LoadWeights(const ModelConfig& config, const std::string& model_dir,
                                         Backend& backend, const TensorParallelShard& shard);
absl::StatusOr<ModelWeights> DummyWeights(const ModelConfig& config, Backend& backend,
                                          uint64_t seed, const TensorParallelShard& shard);

}  // namespace strata::engine

#endif  // STRATA_ENGINE_WEIGHTS_H_
