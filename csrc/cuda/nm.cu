// N:M selection on the GPU (groups and candidates: common/nm.h), byte for byte what cpu/nm.cpp
// writes: the candidate lists that the layerwise or global selection kernels rank, and the packed
// keep-masks built from that selection. One read of the weights each. A scaled entry ranks its
// scaled keys: its list holds them as fp32 bit patterns, so selection rows over it are fp32 keys.
//
// A warp owns one tile of 2048 elements (M divides it); lane l takes groups l, l + 32, ... of the
// tile, so a step of the warp reads 32 neighbouring groups. Mask build puts each group's M bits in
// a per-warp 256-byte shared buffer (groups smaller than a byte are merged by shuffles first); lane
// l then stores word l, touching only the mask_bytes(numel) bytes that belong to the tensor.
#include "../common/bitpack.h"
#include "../common/nm.h"
#include "cuda_common.cuh"

#include <cstdint>
#include <type_traits>

namespace gmp::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kTileElems % kMaxGroup == 0, "tiles hold whole groups");

// Keys of the group at offset `offset` of the tile from element `first` (reader: KT::at(entry, first)).
template <typename KT, int M>
__device__ __forceinline__ void load_group(const KT &reader, const typename KT::bits_t *data, int64_t first, int offset,
                                           uint32_t (&keys)[M]) {
#pragma unroll
    for (int i = 0; i < M; ++i)
        keys[i] = reader.key(__ldg(data + first + offset + i), offset + i);
}

// What a list holds of a candidate: its weight's bits, or for a scaled entry its key (the fp32
// bits of |w| * factor; Python gives that entry a float32 list).
template <typename KT> using ListElement = std::conditional_t<KT::kScaled, uint32_t, typename KT::bits_t>;

template <typename KT, int M>
__device__ void gather_tile(const KT &reader, const typename KT::bits_t *data, ListElement<KT> *list, int64_t first,
                            int count, int n, uint32_t inf, int lane) {
    for (int g = lane; g * M < count; g += 32) {
        const int64_t start = first + int64_t(g) * M;
        uint32_t keys[M];
        load_group<KT, M>(reader, data, first, g * M, keys);
        const auto listed = [&](int i) -> ListElement<KT> {
            if constexpr (KT::kScaled)
                return keys[i];
            else
                return data[start + i];
        };
        const uint32_t candidates = candidate_bits<M>(keys, n);
        ListElement<KT> *dst = list + (start / M) * (M - n);
        int j = 0;
#pragma unroll
        for (int i = 0; i < M; ++i)
            if ((candidates >> i) & 1u)
                dst[j++] = listed(i);
#pragma unroll
        for (int i = 0; i < M; ++i)
            if (keys[i] > inf) { // protected NaN: make the selection over the list see it
                dst[0] = listed(i);
                break;
            }
    }
}

template <typename KT, int M>
__device__ void build_tile(const KT &reader, const typename KT::bits_t *data, uint8_t *mask, uint8_t *staging,
                           int64_t first, int count, int n, const Selection &s, int lane) {
    constexpr int kGroupsPerByte = M < 8 ? 8 / M : 1;
    constexpr uint32_t kGroupBits = M == 32 ? 0xffffffffu : (1u << M) - 1;
    const int groups = count / M;
    for (int base = 0; base < groups; base += 32) { // uniform trip count: every lane shuffles
        const int g = base + lane;
        uint32_t keep = 0;
        if (g < groups) {
            const int64_t start = first + int64_t(g) * M;
            uint32_t keys[M];
            load_group<KT, M>(reader, data, first, g * M, keys);
            const uint32_t candidates = candidate_bits<M>(keys, n);
            keep = ~candidates & kGroupBits;
            int64_t position = (start / M) * (M - n);
#pragma unroll
            for (int i = 0; i < M; ++i)
                if ((candidates >> i) & 1u)
                    keep |= uint32_t(is_kept(keys[i], position++, static_cast<uint32_t>(s.key), s.index)) << i;
        }
        if constexpr (M < 8) {
            keep <<= (g % kGroupsPerByte) * M;
#pragma unroll
            for (int offset = 1; offset < kGroupsPerByte; offset *= 2)
                keep |= __shfl_xor_sync(kFullWarp, keep, offset);
            if (g < groups && g % kGroupsPerByte == 0)
                staging[g * M / 8] = static_cast<uint8_t>(keep);
        } else if (g < groups) {
#pragma unroll
            for (int b = 0; b < M / 8; ++b)
                staging[g * (M / 8) + b] = static_cast<uint8_t>(keep >> (8 * b));
        }
    }
    __syncwarp();
    store_tile_word(mask, first, count, reinterpret_cast<const uint64_t *>(staging)[lane], lane);
    __syncwarp(); // the staging buffer is rewritten by the warp's next tile
}

__global__ void __launch_bounds__(kThreads)
    kNmGather(const TensorEntry *table, int64_t entries, int n, int m, const TensorEntry *lists, int64_t total_tiles) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t warps = int64_t(gridDim.x) * kWarps;
    for (int64_t tile = int64_t(blockIdx.x) * kWarps + warp; tile < total_tiles; tile += warps) {
        const int64_t e = entry_of_tile(table, entries, tile);
        const TensorEntry entry = table[e];
        const int count = tile_count(entry, tile);
        if (count == 0 || lists[e].data == 0)
            continue;
        const int64_t first = (tile - entry.tile_base) * kTileElems;
        const uint32_t inf = inf_key(static_cast<int32_t>(entry.dtype), entry_key_space(entry, kNative));
        visit_key_type(entry, kNative, [&](auto kt) {
            using KT = decltype(kt);
            const KT reader = KT::at(entry, first);
            const auto *data = reinterpret_cast<const typename KT::bits_t *>(entry.data);
            auto *list = reinterpret_cast<ListElement<KT> *>(lists[e].data);
            visit_group_size(m, [&](auto size) {
                gather_tile<KT, decltype(size)::value>(reader, data, list, first, count, n, inf, lane);
            });
        });
    }
}

__global__ void __launch_bounds__(kThreads) kNmBuildMasks(const TensorEntry *table, int64_t entries, int n, int m,
                                                          const Selection *selection, int64_t total_tiles) {
    __shared__ __align__(16) uint8_t staging[kWarps][kTileMaskBytes];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t warps = int64_t(gridDim.x) * kWarps;
    for (int64_t tile = int64_t(blockIdx.x) * kWarps + warp; tile < total_tiles; tile += warps) {
        const int64_t e = entry_of_tile(table, entries, tile);
        const TensorEntry entry = table[e];
        const Selection row = selection[e];
        const int count = tile_count(entry, tile);
        if (count == 0 || entry.mask == 0 || row.nan_count > 0)
            continue;
        const int64_t first = (tile - entry.tile_base) * kTileElems;
        auto *mask = reinterpret_cast<uint8_t *>(entry.mask);
        visit_key_type(entry, row.key_space, [&](auto kt) {
            using KT = decltype(kt);
            const KT reader = KT::at(entry, first);
            const auto *data = reinterpret_cast<const typename KT::bits_t *>(entry.data);
            visit_group_size(m, [&](auto size) {
                build_tile<KT, decltype(size)::value>(reader, data, mask, staging[warp], first, count, n, row, lane);
            });
        });
    }
}

void check_nm(int64_t entries, int32_t n, int32_t m, int64_t total_tiles) {
    GMP_CHECK(entries >= 0 && total_tiles >= 0, "entries and total_tiles must be >= 0");
    GMP_CHECK(valid_group(n, m), "N:M needs a power-of-two m in [2, ", kMaxGroup, "] and 1 <= n < m, got ", n, ":", m);
}

} // namespace

void nm_gather(const TensorEntry *table, int64_t entries, int32_t n, int32_t m, const TensorEntry *lists,
               int64_t total_tiles, uintptr_t stream) {
    check_nm(entries, n, m, total_tiles);
    if (entries == 0 || total_tiles == 0)
        return;
    GMP_CHECK(table != nullptr && lists != nullptr, "table and lists pointers must not be null");
    const int blocks = persistent_blocks(kNmGather, kThreads, total_tiles);
    kNmGather<<<blocks, kThreads, 0, as_stream(stream)>>>(table, entries, n, m, lists, total_tiles);
    GMP_CUDA_CHECK(cudaGetLastError());
}

void nm_build_masks(const TensorEntry *table, int64_t entries, int32_t n, int32_t m, const Selection *selection,
                    int64_t total_tiles, uintptr_t stream) {
    check_nm(entries, n, m, total_tiles);
    if (entries == 0 || total_tiles == 0)
        return;
    GMP_CHECK(table != nullptr && selection != nullptr, "table and selection pointers must not be null");
    const int blocks = persistent_blocks(kNmBuildMasks, kThreads, total_tiles);
    kNmBuildMasks<<<blocks, kThreads, 0, as_stream(stream)>>>(table, entries, n, m, selection, total_tiles);
    GMP_CUDA_CHECK(cudaGetLastError());
}

} // namespace gmp::cuda
