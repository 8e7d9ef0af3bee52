// Device-side helpers shared by the CUDA kernels: error checks, the stream handle, and the
// tile -> table-entry lookup of the flat persistent grids.
#pragma once

#include "../common/checks.h"
#include "../common/dtype.h"
#include "../common/tensor_table.h"
#include "../ops.h"

#include <cuda_runtime.h>

#include <algorithm>

#define GMP_CUDA_CHECK(expr)                                                                       \
    do {                                                                                           \
        const cudaError_t gmp_err = (expr);                                                        \
        GMP_RUNTIME_CHECK(gmp_err == cudaSuccess, #expr, " failed: ", cudaGetErrorString(gmp_err)); \
    } while (0)

namespace gmp::cuda {

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Grid size of a persistent kernel: enough blocks to fill every SM of the current device.
inline int persistent_blocks(int threads_per_block, int64_t work_items, int blocks_per_sm = 4) {
    int device = 0, sms = 0;
    GMP_CUDA_CHECK(cudaGetDevice(&device));
    GMP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    const int64_t wanted = ceil_div<int64_t>(work_items, threads_per_block / 32);
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(sms) * blocks_per_sm)));
}

// Entry e with table[e].tile_base <= tile < table[e + 1].tile_base (bases ascend with e).
__device__ __forceinline__ int64_t entry_of_tile(const TensorEntry *table, int64_t n, int64_t tile) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (table[mid].tile_base <= tile)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

} // namespace gmp::cuda
