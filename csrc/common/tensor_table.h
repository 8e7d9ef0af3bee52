// The tensor table: how a list of tensors crosses from Python to the kernels.
//
// Python builds an int64 tensor of shape [n, 6] (gmp_ext/backends/base.py: build_table) whose rows are these
// structs; for CUDA it lives on the device, so a launch needs no host metadata.
#pragma once

#include <cstdint>

namespace gmp {

struct TensorEntry {
    uint64_t data;     // address of element 0 (contiguous)
    uint64_t mask;     // address of the packed mask (bitpack.h), 0 when the op needs none
    int64_t numel;     // number of elements
    int64_t dtype;     // DType code (dtype.h)
    int64_t elem_base; // global index of element 0: sum of numel of the entries before it
    int64_t tile_base; // first tile of this entry when each entry is cut into the backend's
                       // tiles (CUDA: cuda::kTileElems); lets a flat grid find its entry
};
static_assert(sizeof(TensorEntry) == 6 * sizeof(int64_t), "table rows are six int64 columns");

// One row per table entry, written by selection and read by mask build: prune the elements
// whose (key, flat index) <= (key, index) in the key space given. Shape [n, 4] int64.
struct Selection {
    int64_t key;       // threshold key (keys.h)
    int64_t index;     // flat index within the entry; -1: no element with this key is pruned
    int64_t key_space; // KeySpace (dtype.h)
    int64_t nan_count; // NaN weights seen (> 0: the selection is void and mask build skips the
                       // entry; global: the total)
};
static_assert(sizeof(Selection) == 4 * sizeof(int64_t), "selection rows are four int64 columns");

} // namespace gmp
