// Packed keep-mask build from a selection row, and bool <-> bit packing (layout: bitpack.h).
#include "../common/bitpack.h"
#include "../ops.h"
#include "cpu_common.h"

#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace gmp::cpu {
namespace {

// Keep-bits of 64 elements starting at `first`: bit j = key(first + j) >= limit. Generic form;
// the overloads below do the same with SSE2 compares where the key is the raw bits less the sign
// bit (signed compares are exact: keys and limit - 1 fit in the positive range).
template <typename Reader> inline uint64_t keep_word(const Reader &key_of, int64_t first, uint64_t limit) {
    uint64_t word = 0;
    for (int j = 0; j < 64; ++j)
        word |= uint64_t(key_of(first + j) >= limit) << j;
    return word;
}

#if defined(__SSE2__)
inline uint64_t keep_word(const KeyReader<kFloat32, kNative> &key_of, int64_t first, uint64_t limit) {
    if (limit > (uint64_t(1) << 31))
        return keep_word<KeyReader<kFloat32, kNative>>(key_of, first, limit);
    const __m128i magnitude = _mm_set1_epi32(0x7fffffff);
    const __m128i below = _mm_set1_epi32(static_cast<int32_t>(limit - 1)); // key >= limit <=> key > limit - 1
    const auto *p = reinterpret_cast<const __m128i *>(key_of.bits + first);
    uint64_t word = 0;
    for (int q = 0; q < 16; ++q) {
        const __m128i keys = _mm_and_si128(_mm_loadu_si128(p + q), magnitude);
        word |= uint64_t(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(keys, below)))) << (4 * q);
    }
    return word;
}

template <int32_t D> inline uint64_t keep_word16(const KeyReader<D, kNative> &key_of, int64_t first, uint64_t limit) {
    if (limit > (uint64_t(1) << 15))
        return keep_word<KeyReader<D, kNative>>(key_of, first, limit);
    const __m128i magnitude = _mm_set1_epi16(0x7fff);
    const __m128i below = _mm_set1_epi16(static_cast<int16_t>(limit - 1));
    const auto *p = reinterpret_cast<const __m128i *>(key_of.bits + first);
    uint64_t word = 0;
    for (int q = 0; q < 8; ++q) {
        const __m128i keep = _mm_cmpgt_epi16(_mm_and_si128(_mm_loadu_si128(p + q), magnitude), below);
        const auto bytes = static_cast<uint32_t>(_mm_movemask_epi8(_mm_packs_epi16(keep, _mm_setzero_si128())));
        word |= uint64_t(bytes & 0xffu) << (8 * q);
    }
    return word;
}

inline uint64_t keep_word(const KeyReader<kFloat16, kNative> &key_of, int64_t first, uint64_t limit) {
    return keep_word16(key_of, first, limit);
}

inline uint64_t keep_word(const KeyReader<kBFloat16, kNative> &key_of, int64_t first, uint64_t limit) {
    return keep_word16(key_of, first, limit);
}
#endif

inline uint64_t load_word(const uint8_t *mask, int64_t first, int64_t count) {
    uint64_t word = 0;
    std::memcpy(&word, mask + first / 8, static_cast<size_t>(ceil_div<int64_t>(count, 8)));
    return word;
}

} // namespace

void build_masks(const TensorEntry *table, int64_t n, const Selection *selection, int num_threads, bool zero_pruned) {
    check_table(table, n, true);
    GMP_CHECK(n == 0 || selection != nullptr, "selection pointer must not be null");
    for (int64_t e = 0; e < n; ++e)
        check_selection_row(selection[e], e, table[e].numel);
    const std::vector<Tile> tiles = make_tiles(table, n);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    parallel_for(threads_for(num_threads, num_tiles * kTileElems), num_tiles, [&](int64_t t, int) {
        const Tile &tile = tiles[t];
        const TensorEntry &entry = table[tile.entry];
        const Selection &s = selection[tile.entry];
        // The apply runs on each tile right after its build, while the tile is still in cache.
        if (s.nan_count > 0) {
            if (zero_pruned)
                apply_mask_range(entry, tile.begin, tile.end); // by the mask the row left as it was
            return;
        }
        auto *mask = reinterpret_cast<uint8_t *>(entry.mask);
        const uint64_t key = static_cast<uint64_t>(s.key);
        visit_keys(entry, static_cast<int32_t>(s.key_space), [&](auto key_of) {
            for (int64_t first = tile.begin; first < tile.end; first += 64) {
                const int64_t count = std::min<int64_t>(64, tile.end - first);
                uint64_t word = 0;
                if (first > s.index || first + count - 1 <= s.index) {
                    // The index test is the same for the whole word: ties are all kept
                    // (first > index) or all pruned, so keep = key >= limit.
                    const uint64_t limit = first > s.index ? key : key + 1;
                    if (count == 64) {
                        word = keep_word(key_of, first, limit);
                    } else {
                        for (int64_t j = 0; j < count; ++j)
                            word |= uint64_t(key_of(first + j) >= limit) << j;
                    }
                } else {
                    for (int64_t j = 0; j < count; ++j)
                        word |= uint64_t(is_kept(key_of(first + j), first + j, static_cast<uint32_t>(key), s.index))
                                << j;
                }
                store_word(mask, first, word, count);
            }
        });
        if (zero_pruned)
            apply_mask_range(entry, tile.begin, tile.end);
    });
}

void pack_bits(const uint8_t *bools, int64_t numel, uint8_t *packed, int num_threads) {
    GMP_CHECK(numel >= 0, "numel must be >= 0, got ", numel);
    GMP_CHECK(numel == 0 || (bools != nullptr && packed != nullptr), "null pointer");
    const int64_t words = ceil_div<int64_t>(numel, 64);
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads, numel))
    for (int64_t w = 0; w < words; ++w) {
        const int64_t first = w * 64;
        const int64_t count = std::min<int64_t>(64, numel - first);
        uint64_t word = 0;
        for (int64_t j = 0; j < count; ++j)
            word |= uint64_t(bools[first + j] != 0) << j;
        store_word(packed, first, word, count);
    }
}

void unpack_bits(const uint8_t *packed, int64_t numel, uint8_t *bools, int num_threads) {
    GMP_CHECK(numel >= 0, "numel must be >= 0, got ", numel);
    GMP_CHECK(numel == 0 || (bools != nullptr && packed != nullptr), "null pointer");
    const int64_t words = ceil_div<int64_t>(numel, 64);
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads, numel))
    for (int64_t w = 0; w < words; ++w) {
        const int64_t first = w * 64;
        const int64_t count = std::min<int64_t>(64, numel - first);
        const uint64_t word = load_word(packed, first, count);
        for (int64_t j = 0; j < count; ++j)
            bools[first + j] = static_cast<uint8_t>((word >> j) & 1u);
    }
}

} // namespace gmp::cpu
