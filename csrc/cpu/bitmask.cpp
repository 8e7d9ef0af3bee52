// Packed keep-mask build from a selection row, and bool <-> bit packing (layout: bitpack.h).
#include "../common/bitpack.h"
#include "../ops.h"
#include "cpu_common.h"

#include <cstring>

namespace gmp::cpu {
namespace {

// Stores the low `count` bits of `word` at bit `first` (a multiple of 64) of `mask`, touching
// only the mask_bytes(first + count) bytes that belong to the tensor.
inline void store_word(uint8_t *mask, int64_t first, uint64_t word, int64_t count) {
    std::memcpy(mask + first / 8, &word, static_cast<size_t>(ceil_div<int64_t>(count, 8)));
}

inline uint64_t load_word(const uint8_t *mask, int64_t first, int64_t count) {
    uint64_t word = 0;
    std::memcpy(&word, mask + first / 8, static_cast<size_t>(ceil_div<int64_t>(count, 8)));
    return word;
}

} // namespace

void build_masks(const TensorEntry *table, int64_t n, const Selection *selection, int num_threads) {
    check_table(table, n, true);
    GMP_CHECK(n == 0 || selection != nullptr, "selection pointer must not be null");
    for (int64_t e = 0; e < n; ++e) {
        const Selection &s = selection[e];
        GMP_CHECK(s.key >= 0 && s.key <= int64_t(UINT32_MAX), "entry ", e, ": threshold key out of range: ", s.key);
        GMP_CHECK(s.index >= -1 && s.index < std::max<int64_t>(table[e].numel, 1), "entry ", e,
                  ": threshold index out of range: ", s.index);
        GMP_CHECK(s.key_space == kNative || s.key_space == kWide, "entry ", e, ": unknown key space ", s.key_space);
    }
    const std::vector<Tile> tiles = make_tiles(table, n);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads, num_tiles *kTileElems))
    for (int64_t t = 0; t < num_tiles; ++t) {
        const Tile &tile = tiles[t];
        const TensorEntry &entry = table[tile.entry];
        const Selection &s = selection[tile.entry];
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
                    for (int64_t j = 0; j < count; ++j)
                        word |= uint64_t(key_of(first + j) >= limit) << j;
                } else {
                    for (int64_t j = 0; j < count; ++j)
                        word |= uint64_t(is_kept(key_of(first + j), first + j, static_cast<uint32_t>(key), s.index))
                                << j;
                }
                store_word(mask, first, word, count);
            }
        });
    }
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
