// Fused multi-tensor mask apply (apex multi_tensor_apply style): one launch for every tensor of a device,
// from the device-resident table, so it is CUDA-graph capturable and needs no host metadata.
//
// A warp owns one tile of 2048 elements = 32 mask words of 64 bits: lane l loads word l, then
// each lane handles 16-byte vectors whose bits it takes from the owning lane by shuffle.
#include "../common/bitpack.h"
#include "cuda_common.cuh"

#include <cstdint>

namespace gmp::cuda {
namespace {

constexpr int kThreads = 256;
static_assert(kTileElems == 32 * 64, "a warp covers 32 64-bit mask words");

__global__ void __launch_bounds__(kThreads) kApplyMasks(const TensorEntry *table, int64_t n, int64_t total_tiles) {
    const int lane = threadIdx.x % 32;
    const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
    for (int64_t tile = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32; tile < total_tiles; tile += warps) {
        const TensorEntry entry = table[entry_of_tile(table, n, tile)];
        const int64_t first = (tile - entry.tile_base) * kTileElems;
        const int64_t count = min(kTileElems, entry.numel - first);
        const auto *mask = reinterpret_cast<const uint8_t *>(entry.mask);
        // The word loads need an 8-byte aligned mask; a view at another offset goes bit by bit.
        const bool vector = count == kTileElems && entry.data % 16 == 0 && entry.mask % 8 == 0;
        if (vector) {
            // Masks are padded to kMaskAlignBytes, so every word of a full tile is in bounds.
            const uint64_t my_word = reinterpret_cast<const uint64_t *>(mask)[first / 64 + lane];
            if (__all_sync(0xffffffffu, my_word == ~uint64_t(0)))
                continue;
            if (entry.dtype == kFloat32)
                apply_tile_vector<4>(reinterpret_cast<uint4 *>(entry.data + first * 4), my_word, lane);
            else
                apply_tile_vector<2>(reinterpret_cast<uint4 *>(entry.data + first * 2), my_word, lane);
        } else if (entry.dtype == kFloat32) {
            apply_tile_scalar(reinterpret_cast<uint32_t *>(entry.data), mask, first, count, lane);
        } else {
            apply_tile_scalar(reinterpret_cast<uint16_t *>(entry.data), mask, first, count, lane);
        }
    }
}

} // namespace

void apply_masks(const TensorEntry *table, int64_t n, int64_t total_tiles, uintptr_t stream) {
    GMP_CHECK(n >= 0 && total_tiles >= 0, "n and total_tiles must be >= 0");
    if (n == 0 || total_tiles == 0)
        return;
    GMP_CHECK(table != nullptr, "table pointer is null");
    const int blocks = persistent_blocks(kApplyMasks, kThreads, total_tiles);
    kApplyMasks<<<blocks, kThreads, 0, as_stream(stream)>>>(table, n, total_tiles);
    GMP_CUDA_CHECK(cudaGetLastError());
}

} // namespace gmp::cuda
