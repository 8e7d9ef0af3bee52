// Fused multi-tensor mask apply: one call zeroes the pruned elements of every table entry.
#include "../ops.h"
#include "cpu_common.h"

#include <cstring>

namespace gmp::cpu {
namespace {

// Clears the elements of one tile whose mask bit is 0, 64 at a time; all-kept words are
// skipped without a store, all-pruned words become one memset.
template <typename Bits> void apply_tile(Bits *data, const uint8_t *mask, int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += 64) {
        const int64_t count = std::min<int64_t>(64, end - first);
        uint64_t word = 0;
        std::memcpy(&word, mask + first / 8, static_cast<size_t>(ceil_div<int64_t>(count, 8)));
        const uint64_t all = count == 64 ? ~uint64_t(0) : (uint64_t(1) << count) - 1;
        if ((word & all) == all)
            continue;
        if ((word & all) == 0) {
            std::memset(data + first, 0, static_cast<size_t>(count) * sizeof(Bits));
            continue;
        }
        for (int64_t j = 0; j < count; ++j)
            data[first + j] &= static_cast<Bits>(Bits(0) - static_cast<Bits>((word >> j) & 1u));
    }
}

} // namespace

void apply_masks(const TensorEntry *table, int64_t n, int num_threads) {
    check_table(table, n, true);
    const std::vector<Tile> tiles = make_tiles(table, n);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads, num_tiles * kTileElems))
    for (int64_t t = 0; t < num_tiles; ++t) {
        const Tile &tile = tiles[t];
        const TensorEntry &entry = table[tile.entry];
        const auto *mask = reinterpret_cast<const uint8_t *>(entry.mask);
        if (entry.dtype == kFloat32)
            apply_tile(reinterpret_cast<uint32_t *>(entry.data), mask, tile.begin, tile.end);
        else
            apply_tile(reinterpret_cast<uint16_t *>(entry.data), mask, tile.begin, tile.end);
    }
}

} // namespace gmp::cpu
