// Exact k-th smallest (|w|, index) selection by histogram radix select.
//
// Keys are the |w| bit patterns (keys.h). Pass 1 histograms the high 15-16 key bits. For
// 15-bit keys that digit is the whole key; for 31-bit keys the chosen bucket is either
// compacted into a small buffer of (low key bits, index) composites and finished with
// nth_element, or, when ties make it too large, histogrammed again on the low 15 bits.
// A final tie pass finds the index of the k-th element among those equal to the threshold key.
// Zero fast path: pass 1 also counts the exact zeros of every tile; when there are at least k
// (weights that already hold their pruned zeros), the k-th zero is found from those counts and
// one tile, without further passes.
// Threads: a per-layer call is one parallel region over its entries, each selected by one thread
// (only an entry too large to balance is shared by all threads); tiles and entries are handed out
// one at a time, so few regions and barriers are met and a thread the OS holds back (other
// processes busy on the cores) delays one unit of work instead of a fixed share.
// Extra memory: one histogram per thread, one count per tile and at most `cap` composites.
#include "../ops.h"
#include "cpu_common.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace gmp::cpu {
namespace {

// Entries up to this size select on a composite copy of themselves, one thread each: cheaper
// than clearing a 64K-bin histogram.
constexpr int64_t kSmallEntry = int64_t(1) << 14;
// Composite layout: (low key bits << kIndexBits) | global index.
constexpr int kIndexBits = 49;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
constexpr int64_t kMinCandidates = int64_t(1) << 16;

struct KeyRange {
    const TensorEntry *table;
    const std::vector<Tile> *tiles;
    int32_t space;
    int num_threads;
};

struct Threshold {
    uint32_t key = 0;
    int64_t index = -1; // in the selection's global order; -1 together with key 0: nothing pruned
    int64_t nan_count = 0;
};

// Zero keys of pass 1 are counted in this many extra bins, taken in turn: pruned weights would
// otherwise all increment bin 0, one long chain of dependent memory updates.
constexpr uint32_t kZeroSlots = 8;

// counts[(key >> shift) & (bins - 1)] over elements whose key >> prefix_shift == prefix (when
// Filtered); with CountZeros, zeros[t] = exact zero keys in tile t as well (the zero fast path).
// Per-thread uint32 histograms are flushed into uint64 ones before they could overflow.
template <bool Filtered, bool CountZeros = false>
std::vector<uint64_t> histogram(const KeyRange &r, int shift, uint32_t bins, int prefix_shift, uint32_t prefix,
                                int64_t *zeros = nullptr) {
    const auto &tiles = *r.tiles;
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    const int nt = threads_for(r.num_threads, num_tiles * kTileElems);
    const uint32_t slots = bins + (CountZeros ? kZeroSlots : 0);
    std::vector<std::vector<uint32_t>> local(nt, std::vector<uint32_t>(slots, 0));
    std::vector<std::vector<uint64_t>> wide(nt);
    std::vector<int64_t> pending(nt, 0);
    parallel_for(nt, num_tiles, [&](int64_t t, int thread) {
        auto &counts = local[thread];
        const Tile &tile = tiles[t];
        if (pending[thread] + kTileElems > int64_t(UINT32_MAX)) {
            wide[thread].resize(slots, 0);
            for (uint32_t b = 0; b < slots; ++b)
                wide[thread][b] += counts[b];
            std::fill(counts.begin(), counts.end(), 0u);
            pending[thread] = 0;
        }
        pending[thread] += tile.end - tile.begin;
        const auto zeros_so_far = [&] {
            int64_t z = 0;
            for (uint32_t b = bins; b < slots; ++b)
                z += counts[b];
            return z;
        };
        const int64_t zeros_before = CountZeros ? zeros_so_far() : 0;
        visit_keys(r.table[tile.entry], r.space, [&](auto key_of) {
            const uint32_t digit_mask = bins - 1;
            for (int64_t i = tile.begin; i < tile.end; ++i) {
                const uint32_t key = key_of(i);
                if constexpr (CountZeros)
                    ++counts[key == 0 ? bins + (uint32_t(i) & (kZeroSlots - 1)) : (key >> shift) & digit_mask];
                else if (!Filtered || (key >> prefix_shift) == prefix)
                    ++counts[(key >> shift) & digit_mask];
            }
        });
        if constexpr (CountZeros)
            zeros[t] = zeros_so_far() - zeros_before;
    });
    std::vector<uint64_t> counts(bins, 0);
    for (int thread = 0; thread < nt; ++thread)
        for (uint32_t b = 0; b < slots; ++b) // zero slots go to bin 0, the digit of key 0
            counts[b < bins ? b : 0] += local[thread][b] + (wide[thread].empty() ? 0 : wide[thread][b]);
    return counts;
}

// Count of elements with key > limit (exact NaN count when limit is the infinity key).
int64_t count_above(const KeyRange &r, uint32_t limit) {
    const auto &tiles = *r.tiles;
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    std::vector<int64_t> per_tile(num_tiles, 0);
    parallel_for(threads_for(r.num_threads, num_tiles * kTileElems), num_tiles, [&](int64_t t, int) {
        const Tile &tile = tiles[t];
        visit_keys(r.table[tile.entry], r.space, [&](auto key_of) {
            for (int64_t i = tile.begin; i < tile.end; ++i)
                per_tile[t] += key_of(i) > limit;
        });
    });
    int64_t total = 0;
    for (int64_t c : per_tile)
        total += c;
    return total;
}

// First bucket whose cumulative count reaches rank (1-based); rank becomes the rank inside it.
uint32_t find_bucket(const std::vector<uint64_t> &counts, int64_t &rank) {
    for (uint32_t b = 0; b < counts.size(); ++b) {
        if (static_cast<int64_t>(counts[b]) >= rank)
            return b;
        rank -= static_cast<int64_t>(counts[b]);
    }
    throw std::runtime_error("gmp_ext._C: selection rank exceeds the element count");
}

// Global index of the rank-th (1-based) element whose key equals `key`, in tile order, given the
// number of such elements in each tile: walks the counts, then reads one tile.
int64_t locate_tie(const KeyRange &r, uint32_t key, int64_t rank, const std::vector<int64_t> &per_tile) {
    const auto &tiles = *r.tiles;
    for (size_t t = 0; t < tiles.size(); ++t) {
        if (per_tile[t] < rank) {
            rank -= per_tile[t];
            continue;
        }
        const Tile &tile = tiles[t];
        int64_t found = -1;
        visit_keys(r.table[tile.entry], r.space, [&](auto key_of) {
            for (int64_t i = tile.begin; i < tile.end; ++i)
                if (key_of(i) == key && --rank == 0) {
                    found = tile.base + i;
                    return;
                }
        });
        return found;
    }
    throw std::runtime_error("gmp_ext._C: tie rank exceeds the tie count");
}

// Global index of the rank-th (1-based) element whose key equals `key`, in tile order.
int64_t find_tie(const KeyRange &r, uint32_t key, int64_t rank) {
    const auto &tiles = *r.tiles;
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    std::vector<int64_t> per_tile(num_tiles, 0);
    parallel_for(threads_for(r.num_threads, num_tiles * kTileElems), num_tiles, [&](int64_t t, int) {
        const Tile &tile = tiles[t];
        int64_t c = 0;
        visit_keys(r.table[tile.entry], r.space, [&](auto key_of) {
            for (int64_t i = tile.begin; i < tile.end; ++i)
                c += key_of(i) == key;
        });
        per_tile[t] = c;
    });
    return locate_tie(r, key, rank, per_tile);
}

// Composites ((key & low_mask) << kIndexBits | global index) of the elements in bucket `prefix`.
std::vector<uint64_t> gather_bucket(const KeyRange &r, int low_bits, uint32_t prefix, int64_t expected) {
    const auto &tiles = *r.tiles;
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    const int nt = threads_for(r.num_threads, num_tiles * kTileElems);
    std::vector<std::vector<uint64_t>> parts(nt);
    for (auto &part : parts)
        part.reserve(static_cast<size_t>(expected / nt + 64));
    const uint32_t low_mask = (1u << low_bits) - 1;
    // Composites are unique, so the order in which threads take tiles does not matter.
    parallel_for(nt, num_tiles, [&](int64_t t, int thread) {
        auto &part = parts[thread];
        const Tile &tile = tiles[t];
        visit_keys(r.table[tile.entry], r.space, [&](auto key_of) {
            for (int64_t i = tile.begin; i < tile.end; ++i) {
                const uint32_t key = key_of(i);
                if ((key >> low_bits) == prefix)
                    part.push_back((uint64_t(key & low_mask) << kIndexBits) | uint64_t(tile.base + i));
            }
        });
    });
    std::vector<uint64_t> all;
    all.reserve(static_cast<size_t>(expected));
    for (auto &part : parts) {
        all.insert(all.end(), part.begin(), part.end());
        std::vector<uint64_t>().swap(part);
    }
    return all;
}

// k-th smallest (key, global index) over all tiles of `r`, whose keys have `bits` bits and
// whose NaNs are the keys above `inf`. k == 0 still scans once so NaNs are always reported.
Threshold select_tiles(const KeyRange &r, int64_t total, int64_t k, int bits, uint32_t inf) {
    const int low_bits = bits > 16 ? bits - 16 : 0;
    const uint32_t bins = 1u << (bits - low_bits);
    std::vector<int64_t> zeros(r.tiles->size(), 0);
    const std::vector<uint64_t> counts = histogram<false, true>(r, low_bits, bins, 0, 0, zeros.data());

    Threshold result;
    const uint32_t inf_bucket = inf >> low_bits;
    if (low_bits > 0 && counts[inf_bucket] > 0) {
        result.nan_count = count_above(r, inf); // the infinity bucket also holds small NaN payloads
    } else {
        for (uint32_t b = inf_bucket + 1; b < bins; ++b)
            result.nan_count += static_cast<int64_t>(counts[b]);
    }
    if (result.nan_count > 0 || k == 0)
        return result;
    // Zero fast path: the weights already hold at least k pruned zeros (the steady state of a
    // constant sparsity), so T = 0 and the k-th zero in index order is found from the counts.
    int64_t zero_count = 0;
    for (int64_t z : zeros)
        zero_count += z;
    if (k <= zero_count) {
        result.index = locate_tie(r, 0, k, zeros);
        return result;
    }

    int64_t rank = k;
    const uint32_t bucket = find_bucket(counts, rank);
    uint32_t key = bucket;
    if (low_bits > 0) {
        const int64_t in_bucket = static_cast<int64_t>(counts[bucket]);
        const int64_t cap = std::max(kMinCandidates, total / 64);
        if (in_bucket <= cap) {
            std::vector<uint64_t> candidates = gather_bucket(r, low_bits, bucket, in_bucket);
            std::nth_element(candidates.begin(), candidates.begin() + (rank - 1), candidates.end());
            const uint64_t c = candidates[rank - 1];
            result.key = (bucket << low_bits) | static_cast<uint32_t>(c >> kIndexBits);
            result.index = static_cast<int64_t>(c & kIndexMask);
            return result;
        }
        const std::vector<uint64_t> low = histogram<true>(r, 0, 1u << low_bits, low_bits, bucket);
        key = (bucket << low_bits) | find_bucket(low, rank);
    }
    result.key = key;
    result.index = find_tie(r, key, rank);
    return result;
}

Threshold select_small(const TensorEntry &entry, int64_t k) {
    std::vector<uint64_t> composites(static_cast<size_t>(entry.numel));
    const uint32_t inf = inf_key(static_cast<int32_t>(entry.dtype), kNative);
    Threshold result;
    int64_t zeros = 0;
    visit_keys(entry, kNative, [&](auto key_of) {
        for (int64_t i = 0; i < entry.numel; ++i) {
            const uint32_t key = key_of(i);
            result.nan_count += key > inf;
            zeros += key == 0;
            composites[i] = (uint64_t(key) << 32) | uint64_t(i);
        }
    });
    if (result.nan_count > 0 || k == 0)
        return result;
    if (k <= zeros) { // zero fast path: the k-th zero in index order
        for (int64_t i = 0;; ++i)
            if (composites[i] >> 32 == 0 && --k == 0) {
                result.index = i;
                return result;
            }
    }
    std::nth_element(composites.begin(), composites.begin() + (k - 1), composites.end());
    result.key = static_cast<uint32_t>(composites[k - 1] >> 32);
    result.index = static_cast<int64_t>(composites[k - 1] & 0xffffffffu);
    return result;
}

void check_k(int64_t k, int64_t total, int64_t entry) {
    GMP_CHECK(k >= 0 && k <= total, "entry ", entry, ": k must be in [0, ", total, "], got ", k);
}

} // namespace

void select_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, int num_threads) {
    check_table(table, n, false);
    GMP_CHECK(n == 0 || (k != nullptr && out != nullptr), "k and out pointers must not be null");
    for (int64_t e = 0; e < n; ++e)
        check_k(k[e], table[e].numel, e);

    auto write = [&](int64_t e, const Threshold &t) {
        out[e] = Selection{static_cast<int64_t>(t.key), t.index, kNative, t.nan_count};
    };
    auto select_entry = [&](int64_t e, int threads) {
        if (table[e].numel <= kSmallEntry) {
            write(e, select_small(table[e], k[e]));
            return;
        }
        const std::vector<Tile> tiles = make_tiles(&table[e], 1);
        const KeyRange r{&table[e], &tiles, kNative, threads};
        const int32_t dtype = static_cast<int32_t>(table[e].dtype);
        write(e, select_tiles(r, table[e].numel, k[e], key_bits(dtype, kNative), inf_key(dtype, kNative)));
    };

    // Entries holding more than 1/(2 * threads) of the elements are selected by all threads
    // together (a few parallel regions each); all others in one region, each by one thread from
    // the largest down, so a step runs few regions and a thread held back by the OS delays one
    // entry while the others take the rest.
    const int64_t total = total_numel(table, n);
    const int nt = threads_for(num_threads, total);
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t e = 0; e < n; ++e)
        order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return table[a].numel > table[b].numel; });
    size_t shared = 0;
    while (shared < order.size() && nt > 1 && table[order[shared]].numel * 2 * nt > total)
        select_entry(order[shared++], nt);
    parallel_for(nt, static_cast<int64_t>(order.size() - shared),
                 [&](int64_t i, int) { select_entry(order[shared + i], 1); });
}

void select_global(const TensorEntry *table, int64_t n, int64_t k, int32_t key_space, Selection *out, int num_threads) {
    check_table(table, n, false);
    GMP_CHECK(n == 0 || out != nullptr, "out pointer must not be null");
    GMP_CHECK(key_space == kNative || key_space == kWide, "unknown key space ", key_space);
    const int64_t total = total_numel(table, n);
    check_k(k, total, -1);
    GMP_CHECK(total <= int64_t(kIndexMask), "global selection supports at most 2^49 elements, got ", total);
    const int32_t dtype = n > 0 ? static_cast<int32_t>(table[0].dtype) : kFloat32;
    for (int64_t e = 0; e < n; ++e)
        GMP_CHECK(key_space == kWide || table[e].dtype == dtype,
                  "the native key space needs one dtype for all entries; entry ", e, " differs");

    const std::vector<Tile> tiles = make_tiles(table, n);
    const KeyRange r{table, &tiles, key_space, num_threads};
    const Threshold t = select_tiles(r, total, k, key_bits(dtype, key_space), inf_key(dtype, key_space));

    // Translate the global (key, index) into each entry's flat index: entries wholly before the
    // threshold element prune all their ties, entries after it prune none.
    int64_t base = 0;
    for (int64_t e = 0; e < n; ++e) {
        const int64_t numel = table[e].numel;
        const int64_t local = std::clamp<int64_t>(t.index - base, -1, numel - 1);
        out[e] = Selection{static_cast<int64_t>(t.key), t.index < 0 ? -1 : local, key_space, t.nan_count};
        base += numel;
    }
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

} // namespace gmp::cpu
