// Packed keep-mask build (layout: common/bitpack.h) from selection rows in one read of the weights,
// byte for byte what cpu/bitmask.cpp writes: bit i of entry e = is_kept(key_i, i, row.key, row.index),
// key_i the scaled key for a scaled entry (its rows are in the wide space).
//
// A warp owns one tile of 2048 elements = 32 mask words of 64 bits. On full tiles of 16-byte
// aligned data each lane turns a 16-byte vector into 4 (fp32) or 8 (16-bit) bits, which land as a
// nibble or byte in a per-warp 256-byte shared buffer; lane l then stores word l, so the tile's
// mask is one coalesced 256-byte store. Partial and misaligned tiles, and those of scaled
// entries, take one element per lane and step and gather bits with ballots. With zero_pruned the
// build also zeroes the pruned elements from the registers it read them into (a prepared prune
// step's build and apply in one pass); a row with NaNs keeps its mask and zeroes by it. Given a
// `kept` buffer, each warp adds its tile's kept bits (lane l: word l) to its entry's count.
#include "../common/bitpack.h"
#include "cuda_common.cuh"

#include <cstdint>

namespace gmp::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kTileElems == 32 * 64, "a warp covers 32 64-bit mask words");

struct Threshold {
    uint32_t key;
    int64_t index;
};

// Word `lane` of the tile's mask as it is: its bits among the tile's first `count` elements.
__device__ __forceinline__ uint64_t tile_word(const uint8_t *mask, int64_t first, int count, int lane) {
    const int own = count - 64 * lane;
    if (own <= 0)
        return 0;
    const uint8_t *src = mask + first / 8 + 8 * lane;
    uint64_t word = 0;
    for (int b = 0; b < min(8, ceil_div(own, 8)); ++b)
        word |= uint64_t(src[b]) << (8 * b);
    return own >= 64 ? word : word & ((uint64_t(1) << own) - 1);
}

// Adds the set bits of the warp's words (one a lane) to kept[e]: one atomic a tile.
__device__ __forceinline__ void add_kept(int64_t *kept, int64_t e, uint64_t word, int lane) {
    int count = __popcll(word);
    for (int offset = 16; offset > 0; offset /= 2)
        count += __shfl_xor_sync(kFullWarp, count, offset);
    if (lane == 0)
        atomicAdd(reinterpret_cast<unsigned long long *>(kept + e), static_cast<unsigned long long>(count));
}

// ZeroPruned: the apply fused in, from the registers the build read the tile into (plain loads:
// __ldg's read-only path is not for memory the kernel writes). Returns the lane's mask word.
template <typename KT, bool ZeroPruned>
__device__ uint64_t build_tile_vector(const KT &keys, uint4 *data, uint64_t *words, uint8_t *staging, int64_t first,
                                      Threshold t, int lane) {
    constexpr int kVecs = int(kTileElems) / KT::kPerVec / 32; // vectors per lane
    constexpr uint32_t kVecBits = (1u << KT::kPerVec) - 1;
    uint4 v[kVecs];
#pragma unroll
    for (int j = 0; j < kVecs; ++j)
        v[j] = ZeroPruned ? data[j * 32 + lane] : __ldg(data + j * 32 + lane);
#pragma unroll
    for (int j = 0; j < kVecs; ++j) {
        const int vec = j * 32 + lane; // elements [vec * kPerVec, (vec + 1) * kPerVec) of the tile
        const int64_t index = first + int64_t(vec) * KT::kPerVec;
        uint32_t bits = 0;
#pragma unroll
        for (int q = 0; q < KT::kPerVec; ++q)
            bits |= uint32_t(is_kept(keys.key(v[j], q, vec * KT::kPerVec + q), index + q, t.key, t.index)) << q;
        if (ZeroPruned && bits != kVecBits)
            store_if_changed(data + vec, v[j], keep_elements<int(sizeof(typename KT::bits_t))>(v[j], bits));
        stage_vector_bits<KT::kPerVec>(staging, vec, bits, lane);
    }
    __syncwarp();
    const uint64_t word = reinterpret_cast<const uint64_t *>(staging)[lane];
    words[lane] = word;
    __syncwarp(); // the staging buffer is rewritten by the warp's next tile
    return word;
}

// Returns the lane's mask word (0 past the tile's count).
template <typename KT, bool ZeroPruned>
__device__ uint64_t build_tile_scalar(const KT &keys, typename KT::bits_t *data, uint8_t *mask, int64_t first,
                                      int count, Threshold t, int lane) {
    // Step c covers elements [32c, 32c + 32) of the tile: half of word c / 2, which lane c / 2 keeps.
    uint64_t word = 0;
    for (int c = 0; c * 32 < count; ++c) {
        const int i = c * 32 + lane;
        const typename KT::bits_t bits = i < count ? data[first + i] : 0;
        const bool keep = i < count && is_kept(keys.key(bits, i), first + i, t.key, t.index);
        if (ZeroPruned && !keep && bits != 0) // as store_if_changed; -0 is written as 0
            data[first + i] = typename KT::bits_t(0);
        const uint32_t ballot = __ballot_sync(kFullWarp, keep);
        if (lane == c / 2)
            word |= uint64_t(ballot) << (32 * (c % 2));
    }
    store_tile_word(mask, first, count, word, lane);
    return word;
}

template <bool ZeroPruned>
__global__ void __launch_bounds__(kThreads) kBuildMasks(const TensorEntry *table, int64_t n, const Selection *selection,
                                                        const int32_t *built, int64_t total_tiles, int64_t *kept) {
    __shared__ __align__(16) uint8_t staging[kWarps][kTileMaskBytes];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t warps = int64_t(gridDim.x) * kWarps;
    for (int64_t tile = int64_t(blockIdx.x) * kWarps + warp; tile < total_tiles; tile += warps) {
        const int64_t e = entry_of_tile(table, n, tile);
        const TensorEntry entry = table[e];
        const Selection row = selection[e];
        const int count = tile_count(entry, tile);
        if (count == 0 || entry.mask == 0 || (built != nullptr && built[e] != 0))
            continue;
        const int64_t first = (tile - entry.tile_base) * kTileElems;
        auto *mask = reinterpret_cast<uint8_t *>(entry.mask);
        if (row.nan_count > 0) { // the mask stays as it was; a fused apply zeroes by it
            if (ZeroPruned && entry.dtype == kFloat32)
                apply_tile_scalar(reinterpret_cast<uint32_t *>(entry.data), mask, first, count, lane);
            else if (ZeroPruned)
                apply_tile_scalar(reinterpret_cast<uint16_t *>(entry.data), mask, first, count, lane);
            if (kept != nullptr)
                add_kept(kept, e, tile_word(mask, first, count, lane), lane);
            continue;
        }
        const Threshold t{static_cast<uint32_t>(row.key), row.index};
        uint64_t word = 0;
        visit_key_type(entry, row.key_space, [&](auto kt) {
            using KT = decltype(kt);
            const KT keys = KT::at(entry, first);
            auto *data = reinterpret_cast<typename KT::bits_t *>(entry.data);
            // first is a multiple of 2048, so a 16-byte aligned tensor has 16-byte aligned tiles and
            // an 8-byte aligned mask has 256-byte aligned tile words.
            if (vector_tile<KT>(entry.data, count) && entry.mask % 8 == 0)
                word = build_tile_vector<KT, ZeroPruned>(keys, reinterpret_cast<uint4 *>(data + first),
                                                         reinterpret_cast<uint64_t *>(mask + first / 8), staging[warp],
                                                         first, t, lane);
            else
                word = build_tile_scalar<KT, ZeroPruned>(keys, data, mask, first, count, t, lane);
        });
        if (kept != nullptr)
            add_kept(kept, e, word, lane);
    }
}

// count_kept: lane l of a tile's warp counts word l of the tile's mask.
__global__ void __launch_bounds__(kThreads)
    kCountKept(const TensorEntry *table, int64_t n, int64_t *kept, int64_t total_tiles) {
    const int lane = threadIdx.x % 32;
    const int64_t warps = int64_t(gridDim.x) * kWarps;
    for (int64_t tile = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; tile < total_tiles; tile += warps) {
        const int64_t e = entry_of_tile(table, n, tile);
        const TensorEntry entry = table[e];
        const int count = tile_count(entry, tile);
        if (count == 0 || entry.mask == 0)
            continue;
        const int64_t first = (tile - entry.tile_base) * kTileElems;
        add_kept(kept, e, tile_word(reinterpret_cast<const uint8_t *>(entry.mask), first, count, lane), lane);
    }
}

} // namespace

void count_kept(const TensorEntry *table, int64_t n, int64_t *kept, int64_t total_tiles, uintptr_t stream) {
    GMP_CHECK(n >= 0 && total_tiles >= 0, "n and total_tiles must be >= 0");
    if (n == 0)
        return;
    GMP_CHECK(table != nullptr && kept != nullptr, "table and kept pointers must not be null");
    GMP_CUDA_CHECK(cudaMemsetAsync(kept, 0, static_cast<size_t>(n) * sizeof(int64_t), as_stream(stream)));
    if (total_tiles == 0)
        return;
    const int blocks = persistent_blocks(kCountKept, kThreads, total_tiles);
    kCountKept<<<blocks, kThreads, 0, as_stream(stream)>>>(table, n, kept, total_tiles);
    GMP_CUDA_CHECK(cudaGetLastError());
}

void build_masks_except(const TensorEntry *table, int64_t n, const Selection *selection, const int32_t *built,
                        int64_t total_tiles, uintptr_t stream, bool zero_pruned, int64_t *kept) {
    GMP_CHECK(n >= 0 && total_tiles >= 0, "n and total_tiles must be >= 0");
    if (kept != nullptr && n > 0)
        GMP_CUDA_CHECK(cudaMemsetAsync(kept, 0, static_cast<size_t>(n) * sizeof(int64_t), as_stream(stream)));
    if (n == 0 || total_tiles == 0)
        return;
    GMP_CHECK(table != nullptr && selection != nullptr, "table and selection pointers must not be null");
    if (zero_pruned) {
        const int blocks = persistent_blocks(kBuildMasks<true>, kThreads, total_tiles);
        kBuildMasks<true><<<blocks, kThreads, 0, as_stream(stream)>>>(table, n, selection, built, total_tiles, kept);
    } else {
        const int blocks = persistent_blocks(kBuildMasks<false>, kThreads, total_tiles);
        kBuildMasks<false><<<blocks, kThreads, 0, as_stream(stream)>>>(table, n, selection, built, total_tiles, kept);
    }
    GMP_CUDA_CHECK(cudaGetLastError());
}

void build_masks(const TensorEntry *table, int64_t n, const Selection *selection, int64_t total_tiles, uintptr_t stream,
                 bool zero_pruned, int64_t *kept) {
    build_masks_except(table, n, selection, nullptr, total_tiles, stream, zero_pruned, kept);
}

} // namespace gmp::cuda
