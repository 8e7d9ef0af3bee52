// The tensor table: how a list of tensors crosses from Python to the kernels.
//
// Python builds an int64 tensor of shape [n, 9] (gmp_ext/kernels/backends/base.py: build_table) whose rows
// are these structs; for CUDA it lives on the device, so a launch needs no host metadata.
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
    // What is ranked (keys.h): |w| when `scale` is 0; else |w| times a per-feature float32 factor
    // (Wanda's input norms), scale[(i / scale_inner) % scale_count] for element i: a vector per
    // tensor instead of a score tensor of the weight's size.
    uint64_t scale;      // address of the float32 factors (scale_count of them), or 0
    int64_t scale_inner; // consecutive elements that share a factor: the product of the sizes of
                         // the dimensions after the feature dimension (>= 1)
    int64_t scale_count; // factors: the size of the feature dimension (>= 1)
};
static_assert(sizeof(TensorEntry) == 9 * sizeof(int64_t), "table rows are nine int64 columns");

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
