// N:M selection (groups and candidates: common/nm.h): the candidate lists that the layerwise or
// global selection ranks, and the packed keep-masks built from that selection. One read of the
// weights each; tiles (multiples of 64 elements) hold whole groups because M divides 64.
#include "../common/nm.h"
#include "../ops.h"
#include "cpu_common.h"

#include <type_traits>
#include <utility>

namespace gmp::cpu {
namespace {

template <typename Reader>
using BitsOf = std::remove_cv_t<std::remove_reference_t<decltype(*std::declval<Reader>().bits)>>;

template <int M, typename Reader> inline void load_group(const Reader &key_of, int64_t first, uint32_t (&keys)[M]) {
    for (int i = 0; i < M; ++i)
        keys[i] = key_of(first + i);
}

template <int M, typename Reader>
void gather_tile(const Reader &key_of, int64_t begin, int64_t end, int n, uint32_t inf, BitsOf<Reader> *out) {
    BitsOf<Reader> last[M]; // the tile's last group, whose spare slots would run into the next tile
    for (int64_t first = begin; first < end; first += M) {
        uint32_t keys[M];
        load_group<M>(key_of, first, keys);
        const uint32_t candidates = candidate_bits<M>(keys, n);
        // Compacted without branches (which elements are candidates is data): every element is
        // written at the next slot, which advances only past candidates; slots past the group's
        // m - n are the next group's, rewritten by it.
        BitsOf<Reader> *listed = first + M < end ? out + (first / M) * (M - n) : last;
        int j = 0;
        uint32_t top = 0;
        for (int i = 0; i < M; ++i) {
            listed[j] = key_of.bits[first + i];
            j += int((candidates >> i) & 1u);
            top = std::max(top, keys[i]);
        }
        if (top > inf) { // a protected NaN: list it first so the selection over the list sees it
            for (int i = 0; i < M; ++i)
                if (keys[i] > inf) {
                    listed[0] = key_of.bits[first + i];
                    break;
                }
        }
        if (listed == last)
            std::copy(last, last + (M - n), out + (first / M) * (M - n));
    }
}

// Keep-bits of the groups in [first, first + count): protected elements, and candidates whose
// (key, position in the candidate list) is above the selection's cut. When the word's candidate
// positions all lie on one side of the cut's index, the test is key >= limit for all of them.
template <int M, typename Reader>
uint64_t build_word(const Reader &key_of, int64_t first, int64_t count, int n, const Selection &s) {
    constexpr uint64_t kGroupBits = (uint64_t(1) << M) - 1;
    const uint64_t key = static_cast<uint64_t>(s.key);
    const int64_t begin = (first / M) * (M - n), end = ((first + count) / M) * (M - n);
    const bool one_side = begin > s.index || end - 1 <= s.index;
    const uint64_t limit = begin > s.index ? key : key + 1;
    uint64_t word = 0;
    int64_t position = begin;
    for (int64_t g = first; g < first + count; g += M) {
        uint32_t keys[M];
        load_group<M>(key_of, g, keys);
        const uint32_t candidates = candidate_bits<M>(keys, n);
        uint64_t keep = ~uint64_t(candidates) & kGroupBits;
        for (int i = 0; i < M; ++i) { // branch-free, as in gather_tile
            const uint64_t candidate = (candidates >> i) & 1u;
            const uint64_t above =
                one_side ? uint64_t(keys[i] >= limit)
                         : uint64_t(keys[i] > key) | (uint64_t(keys[i] == key) & uint64_t(position > s.index));
            keep |= (candidate & above) << i;
            position += int64_t(candidate);
        }
        word |= keep << (g - first);
    }
    return word;
}

void check_nm(const TensorEntry *table, int64_t entries, int32_t n, int32_t m) {
    GMP_CHECK(valid_group(n, m), "N:M needs a power-of-two m in [2, ", kMaxGroup, "] and 1 <= n < m, got ", n, ":", m);
    for (int64_t e = 0; e < entries; ++e)
        GMP_CHECK(table[e].numel % m == 0, "entry ", e, ": numel ", table[e].numel, " is not a multiple of m = ", m);
}

} // namespace

void nm_gather(const TensorEntry *table, int64_t entries, int32_t n, int32_t m, const TensorEntry *lists,
               int num_threads) {
    check_table(table, entries, false);
    check_nm(table, entries, n, m);
    check_table(lists, entries, false);
    for (int64_t e = 0; e < entries; ++e)
        GMP_CHECK(lists[e].numel == table[e].numel / m * (m - n) &&
                      lists[e].dtype == (table[e].scale != 0 ? int64_t(kFloat32) : table[e].dtype),
                  "entry ", e,
                  ": the candidate list must hold numel / m * (m - n) elements of the entry's dtype (of its keys, "
                  "float32, when scaled)");
    const std::vector<Tile> tiles = make_tiles(table, entries);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    parallel_for(threads_for(num_threads, num_tiles * kTileElems), num_tiles, [&](int64_t t, int) {
        const Tile &tile = tiles[t];
        const TensorEntry &entry = table[tile.entry];
        const uint32_t inf = inf_key(static_cast<int32_t>(entry.dtype), entry_key_space(entry, kNative));
        visit_keys(entry, kNative, tile.begin, tile.end, [&](auto key_of) {
            using Reader = decltype(key_of);
            auto *list = reinterpret_cast<BitsOf<Reader> *>(lists[tile.entry].data);
            visit_group_size(
                m, [&](auto size) { gather_tile<decltype(size)::value>(key_of, tile.begin, tile.end, n, inf, list); });
        });
    });
}

void nm_build_masks(const TensorEntry *table, int64_t entries, int32_t n, int32_t m, const Selection *selection,
                    int num_threads) {
    check_table(table, entries, true);
    check_nm(table, entries, n, m);
    GMP_CHECK(entries == 0 || selection != nullptr, "selection pointer must not be null");
    for (int64_t e = 0; e < entries; ++e)
        check_selection_row(selection[e], e, table[e].numel / m * (m - n));
    const std::vector<Tile> tiles = make_tiles(table, entries);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    parallel_for(threads_for(num_threads, num_tiles * kTileElems), num_tiles, [&](int64_t t, int) {
        const Tile &tile = tiles[t];
        const TensorEntry &entry = table[tile.entry];
        const Selection &s = selection[tile.entry];
        if (s.nan_count > 0)
            return;
        auto *mask = reinterpret_cast<uint8_t *>(entry.mask);
        visit_keys(entry, static_cast<int32_t>(s.key_space), tile.begin, tile.end, [&](auto key_of) {
            visit_group_size(m, [&](auto size) {
                for (int64_t first = tile.begin; first < tile.end; first += 64) {
                    const int64_t count = std::min<int64_t>(64, tile.end - first);
                    store_word(mask, first, build_word<decltype(size)::value>(key_of, first, count, n, s), count);
                }
            });
        });
    });
}

} // namespace gmp::cpu
