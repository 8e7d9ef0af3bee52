// Building blocks of a radix select driven from Python, whose histograms are summed across
// processes between passes (gmp_ext/distributed.py): per-entry digit histograms of the keys,
// optionally restricted to a key prefix, and the flat index of the rank-th element equal to a
// key. Extra memory: one uint32 histogram per thread and one count per tile.
#include "../ops.h"
#include "cpu_common.h"

#include <algorithm>
#include <vector>

namespace gmp::cpu {
namespace {

struct Digit {
    int shift;
    uint32_t mask; // bins - 1
    int prefix_shift;
};

// Adds the digits of tile elements whose key >> prefix_shift == prefix (when Filtered) to
// `local`; returns the number of NaN keys (above `inf`) when CountNan, else 0.
template <bool Filtered, bool CountNan, typename KeyOf>
int64_t count_tile(KeyOf key_of, const Tile &tile, const Digit &d, uint32_t prefix, uint32_t inf, uint32_t *local) {
    int64_t nans = 0;
    for (int64_t i = tile.begin; i < tile.end; ++i) {
        const uint32_t key = key_of(i);
        if constexpr (CountNan)
            nans += key > inf;
        if (!Filtered || (key >> d.prefix_shift) == prefix)
            ++local[(key >> d.shift) & d.mask];
    }
    return nans;
}

void check_keys(const int64_t *keys, int64_t n) {
    for (int64_t e = 0; e < n; ++e)
        GMP_CHECK(keys[e] >= 0 && keys[e] <= int64_t(UINT32_MAX), "entry ", e, ": key out of range: ", keys[e]);
}

} // namespace

void histogram(const TensorEntry *table, int64_t n, int32_t key_space, int32_t shift, int64_t bins,
               int32_t prefix_shift, const int64_t *prefixes, int64_t *out, int64_t *nan_counts, int num_threads) {
    check_table(table, n, false);
    GMP_CHECK(key_space == kNative || key_space == kWide, "unknown key space ", key_space);
    check_scaled_space(table, n, key_space);
    GMP_CHECK(bins >= 1 && bins <= (int64_t(1) << 16) && (bins & (bins - 1)) == 0,
              "bins must be a power of two in [1, 65536], got ", bins);
    GMP_CHECK(shift >= 0 && shift < 32 && prefix_shift >= 0 && prefix_shift < 32, "shifts must be in [0, 32), got ",
              shift, " and ", prefix_shift);
    GMP_CHECK(n == 0 || out != nullptr, "out pointer must not be null");
    std::fill(out, out + n * bins, int64_t(0));
    if (nan_counts != nullptr)
        std::fill(nan_counts, nan_counts + n, int64_t(0));

    const Digit digit{shift, static_cast<uint32_t>(bins - 1), prefix_shift};
    const std::vector<Tile> tiles = make_tiles(table, n);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    const int nt = threads_for(num_threads, total_numel(table, n));
#pragma omp parallel num_threads(nt)
    {
        // Tiles are in entry order, so a thread's static chunk visits each entry once: its
        // counts are flushed when the entry changes (or before a uint32 could overflow).
        std::vector<uint32_t> local(static_cast<size_t>(bins), 0u);
        int64_t local_entry = -1;
        int64_t pending = 0;
        auto flush = [&] {
            int64_t *row = out + local_entry * bins;
            for (int64_t b = 0; b < bins; ++b) {
                if (local[b] == 0)
                    continue;
#pragma omp atomic
                row[b] += local[b];
                local[b] = 0;
            }
            pending = 0;
        };
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tiles; ++t) {
            const Tile &tile = tiles[t];
            const int64_t prefix = prefixes == nullptr ? 0 : prefixes[tile.entry];
            if (prefix < 0)
                continue;
            if (tile.entry != local_entry || pending + (tile.end - tile.begin) > int64_t(UINT32_MAX)) {
                if (pending > 0)
                    flush();
                local_entry = tile.entry;
            }
            pending += tile.end - tile.begin;
            const TensorEntry &entry = table[tile.entry];
            const uint32_t inf = inf_key(static_cast<int32_t>(entry.dtype), entry_key_space(entry, key_space));
            const auto p = static_cast<uint32_t>(prefix);
            int64_t nans = 0;
            visit_keys(entry, key_space, tile.begin, tile.end, [&](auto key_of) {
                if (prefixes != nullptr)
                    nans = nan_counts != nullptr ? count_tile<true, true>(key_of, tile, digit, p, inf, local.data())
                                                 : count_tile<true, false>(key_of, tile, digit, p, inf, local.data());
                else
                    nans = nan_counts != nullptr ? count_tile<false, true>(key_of, tile, digit, p, inf, local.data())
                                                 : count_tile<false, false>(key_of, tile, digit, p, inf, local.data());
            });
            if (nans > 0) {
#pragma omp atomic
                nan_counts[tile.entry] += nans;
            }
        }
        if (pending > 0)
            flush();
    }
}

void find_equal(const TensorEntry *table, int64_t n, int32_t key_space, const int64_t *keys, const int64_t *ranks,
                int64_t *out, int num_threads) {
    check_table(table, n, false);
    GMP_CHECK(key_space == kNative || key_space == kWide, "unknown key space ", key_space);
    check_scaled_space(table, n, key_space);
    GMP_CHECK(n == 0 || (keys != nullptr && ranks != nullptr && out != nullptr), "null pointer");
    check_keys(keys, n);

    // Count the matches per tile of the entries that ask, then walk each entry's tiles in order.
    const std::vector<Tile> tiles = make_tiles(table, n);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    std::vector<int64_t> per_tile(static_cast<size_t>(num_tiles), 0);
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads, total_numel(table, n)))
    for (int64_t t = 0; t < num_tiles; ++t) {
        const Tile &tile = tiles[t];
        if (ranks[tile.entry] <= 0)
            continue;
        const auto key = static_cast<uint32_t>(keys[tile.entry]);
        int64_t c = 0;
        visit_keys(table[tile.entry], key_space, tile.begin, tile.end, [&](auto key_of) {
            for (int64_t i = tile.begin; i < tile.end; ++i)
                c += key_of(i) == key;
        });
        per_tile[t] = c;
    }

    std::fill(out, out + n, int64_t(-1));
    std::vector<int64_t> rank(ranks, ranks + n);
    for (int64_t t = 0; t < num_tiles; ++t) {
        const Tile &tile = tiles[t];
        int64_t &r = rank[tile.entry];
        if (r <= 0 || out[tile.entry] >= 0)
            continue;
        if (per_tile[t] < r) {
            r -= per_tile[t];
            continue;
        }
        const auto key = static_cast<uint32_t>(keys[tile.entry]);
        visit_keys(table[tile.entry], key_space, tile.begin, tile.end, [&](auto key_of) {
            for (int64_t i = tile.begin; i < tile.end; ++i)
                if (key_of(i) == key && --r == 0) {
                    out[tile.entry] = i;
                    return;
                }
        });
    }
    for (int64_t e = 0; e < n; ++e)
        GMP_RUNTIME_CHECK(ranks[e] <= 0 || out[e] >= 0, "entry ", e, ": rank ", ranks[e],
                          " exceeds the number of elements equal to key ", keys[e]);
}

} // namespace gmp::cpu
