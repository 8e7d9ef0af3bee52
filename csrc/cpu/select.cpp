// Exact k-th smallest (|w|, index) selection by histogram radix select.
//
// Keys are the |w| bit patterns, or those of |w| times a factor for a scaled entry (keys.h).
// Pass 1 histograms the high 15-16 key bits. For 15-bit keys that digit is the whole key; for
// 31-bit keys the chosen bucket is either compacted into a small buffer of (low key bits, index)
// composites and finished with nth_element, or, when ties make it too large, histogrammed again
// on the low 15 bits.
// A final tie pass finds the index of the k-th element among those equal to the threshold key.
// Zero fast path: pass 1 also counts the exact zeros of every tile; when there are at least k
// (weights that already hold their pruned zeros), the k-th zero is found from those counts and
// one tile, without further passes.
// Selections first try sample select (sample_select.cpp: fp32 and scaled keys, or one 16-bit
// dtype's native keys), which needs one read where it can tell: a global one over all entries,
// each entry of a per-layer one.
// Threads: a per-layer call is one parallel region over its entries, each selected by one thread
// (only an entry too large to balance is shared by all threads); tiles and entries are handed out
// one at a time, so few regions and barriers are met and a thread the OS holds back (other
// processes busy on the cores) delays one unit of work instead of a fixed share.
// Extra memory: one histogram per thread (256 KiB kept by each thread that selected alone), one
// count per tile and at most `cap` composites.
#include "../ops.h"
#include "cpu_common.h"
#include "keep_word.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace gmp::cpu {
namespace {

// Entries up to this size select on a composite copy of themselves, one thread each: cheaper
// than clearing a 64K-bin histogram.
constexpr int64_t kSmallEntry = int64_t(1) << 14;
constexpr int kIndexBits = kCompositeIndexBits;
constexpr uint64_t kIndexMask = kCompositeIndexMask;
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

// Counts of the low `bins` digits (key & (bins - 1)) of the elements whose key >> prefix_shift
// == prefix: the histogram of a bucket too large for the candidate buffer (heavy ties).
// Per-thread uint32 histograms are flushed into uint64 ones before they could overflow.
std::vector<uint64_t> bucket_histogram(const KeyRange &r, uint32_t bins, int prefix_shift, uint32_t prefix) {
    const auto &tiles = *r.tiles;
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    const int nt = threads_for(r.num_threads, num_tiles * kTileElems);
    std::vector<std::vector<uint32_t>> local(nt, std::vector<uint32_t>(bins, 0));
    std::vector<std::vector<uint64_t>> wide(nt);
    std::vector<int64_t> pending(nt, 0);
    parallel_for(nt, num_tiles, [&](int64_t t, int thread) {
        auto &counts = local[thread];
        const Tile &tile = tiles[t];
        if (pending[thread] + kTileElems > int64_t(UINT32_MAX)) {
            wide[thread].resize(bins, 0);
            for (uint32_t b = 0; b < bins; ++b)
                wide[thread][b] += counts[b];
            std::fill(counts.begin(), counts.end(), 0u);
            pending[thread] = 0;
        }
        pending[thread] += tile.end - tile.begin;
        visit_keys(r.table[tile.entry], r.space, tile.begin, tile.end, [&](auto key_of) {
            for (int64_t i = tile.begin; i < tile.end; ++i) {
                const uint32_t key = key_of(i);
                if ((key >> prefix_shift) == prefix)
                    ++counts[key & (bins - 1)];
            }
        });
    });
    std::vector<uint64_t> counts(bins, 0);
    for (int thread = 0; thread < nt; ++thread)
        for (uint32_t b = 0; b < bins; ++b)
            counts[b] += local[thread][b] + (wide[thread].empty() ? 0 : wide[thread][b]);
    return counts;
}

// First of `bins` buckets whose cumulative count reaches rank (1-based); rank becomes the rank
// inside it.
template <typename Counts> uint32_t find_bucket(const Counts &counts, uint32_t bins, int64_t &rank) {
    for (uint32_t b = 0; b < bins; ++b) {
        if (static_cast<int64_t>(counts[b]) >= rank)
            return b;
        rank -= static_cast<int64_t>(counts[b]);
    }
    throw std::runtime_error("gmp_ext._C: selection rank exceeds the element count");
}

// Pass 1 over one tile: adds the digits (key >> shift) of its nonzero keys to `counts` and
// returns the tile's exact zero count. Zeros are found 64 at a time by a vector compare and left
// out of the histogram (the caller puts them in bin 0): weights holding the pruned zeros of an
// earlier step would otherwise send most increments to one bin, a chain of dependent memory
// updates.
template <typename KeyOf> int64_t count_high_digits(KeyOf key_of, const Tile &tile, int shift, uint32_t *counts) {
    int64_t zeros = 0;
    for (int64_t first = tile.begin; first < tile.end; first += 64) {
        const int64_t count = std::min<int64_t>(64, tile.end - first);
        uint64_t nonzero = 0;
        if (count == 64) {
            nonzero = keep_word(key_of, first, 1);
        } else {
            for (int64_t j = 0; j < count; ++j)
                nonzero |= uint64_t(key_of(first + j) != 0) << j;
        }
        if (nonzero == ~uint64_t(0)) {
            // Digits first (a vector loop), then the increments: they no longer wait on the
            // loads and shifts of their own element.
            uint32_t digits[64];
            for (int j = 0; j < 64; ++j)
                digits[j] = key_of(first + j) >> shift;
            for (uint32_t d : digits)
                ++counts[d];
            continue;
        }
        zeros += count - __builtin_popcountll(nonzero);
        for (; nonzero != 0; nonzero &= nonzero - 1)
            ++counts[key_of(first + __builtin_ctzll(nonzero)) >> shift];
    }
    return zeros;
}

// Pass 1's histogram of the high digit (key >> shift, `bins` of them) with the exact zeros in
// bin 0, and zeros[t] = exact zeros of tile t (the zero fast path). One thread counts into uint32
// bins of its own that it keeps between calls and clears with one memset: a per-layer step runs
// one such pass per layer, and allocating, clearing and summing fresh 64K-bin histograms cost
// ~60 us a layer, more than counting a layer of 20K weights. Several threads count into fresh
// uint32 bins, summed into uint64 ones.
class HighDigitHistogram {
  public:
    HighDigitHistogram(const KeyRange &r, int shift, uint32_t bins, int64_t *zeros) : bins_(bins) {
        const auto &tiles = *r.tiles;
        const auto num_tiles = static_cast<int64_t>(tiles.size());
        const int nt = threads_for(r.num_threads, num_tiles * kTileElems);
        if (nt == 1 && num_tiles * kTileElems <= int64_t(UINT32_MAX)) {
            narrow_ = kept_bins(bins);
            for (int64_t t = 0; t < num_tiles; ++t)
                visit_keys(r.table[tiles[t].entry], r.space, tiles[t].begin, tiles[t].end,
                           [&](auto key_of) { zeros[t] = count_high_digits(key_of, tiles[t], shift, narrow_); });
        } else {
            count_in_threads(r, shift, nt, zeros);
        }
        int64_t zero_count = 0;
        for (int64_t t = 0; t < num_tiles; ++t)
            zero_count += zeros[t];
        if (narrow_ != nullptr)
            narrow_[0] += static_cast<uint32_t>(zero_count);
        else
            wide_[0] += static_cast<uint64_t>(zero_count);
    }
    ~HighDigitHistogram() {
        if (narrow_ != nullptr)
            std::fill(narrow_, narrow_ + bins_, 0u);
    }
    HighDigitHistogram(const HighDigitHistogram &) = delete;
    HighDigitHistogram &operator=(const HighDigitHistogram &) = delete;

    int64_t operator[](uint32_t b) const {
        return narrow_ != nullptr ? static_cast<int64_t>(narrow_[b]) : static_cast<int64_t>(wide_[b]);
    }
    // Elements in the bins above `b`.
    int64_t count_above(uint32_t b) const {
        int64_t total = 0;
        for (uint32_t i = b + 1; i < bins_; ++i)
            total += (*this)[i];
        return total;
    }
    uint32_t bins() const { return bins_; }

  private:
    // Threads count into fresh uint32 bins, flushed into the uint64 ones before they could
    // overflow and at the end.
    void count_in_threads(const KeyRange &r, int shift, int nt, int64_t *zeros) {
        const auto &tiles = *r.tiles;
        std::vector<std::vector<uint32_t>> local(nt, std::vector<uint32_t>(bins_, 0));
        const int64_t max_tiles_per_flush = int64_t(UINT32_MAX) / kTileElems;
        std::vector<int64_t> unflushed(nt, 0);
        wide_.assign(bins_, 0);
        parallel_for(nt, static_cast<int64_t>(tiles.size()), [&](int64_t t, int thread) {
            if (++unflushed[thread] > max_tiles_per_flush) {
                flush(local[thread]);
                unflushed[thread] = 1;
            }
            visit_keys(r.table[tiles[t].entry], r.space, tiles[t].begin, tiles[t].end, [&](auto key_of) {
                zeros[t] = count_high_digits(key_of, tiles[t], shift, local[thread].data());
            });
        });
        for (auto &counts : local)
            flush(counts);
    }
    // This thread's bins, all zero between uses.
    static uint32_t *kept_bins(uint32_t bins) {
        thread_local std::vector<uint32_t> cleared;
        if (cleared.size() < bins)
            cleared.assign(bins, 0u);
        return cleared.data();
    }
    void flush(std::vector<uint32_t> &counts) {
        for (uint32_t b = 0; b < bins_; ++b)
            wide_[b] += counts[b];
        std::fill(counts.begin(), counts.end(), 0u);
    }

    uint32_t bins_;
    uint32_t *narrow_ = nullptr;
    std::vector<uint64_t> wide_;
};

// Count of elements with key > limit (exact NaN count when limit is the infinity key).
int64_t count_above(const KeyRange &r, uint32_t limit) {
    const auto &tiles = *r.tiles;
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    std::vector<int64_t> per_tile(num_tiles, 0);
    parallel_for(threads_for(r.num_threads, num_tiles * kTileElems), num_tiles, [&](int64_t t, int) {
        const Tile &tile = tiles[t];
        visit_keys(r.table[tile.entry], r.space, tile.begin, tile.end, [&](auto key_of) {
            for (int64_t i = tile.begin; i < tile.end; ++i)
                per_tile[t] += key_of(i) > limit;
        });
    });
    int64_t total = 0;
    for (int64_t c : per_tile)
        total += c;
    return total;
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
        visit_keys(r.table[tile.entry], r.space, tile.begin, tile.end, [&](auto key_of) {
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
        visit_keys(r.table[tile.entry], r.space, tile.begin, tile.end, [&](auto key_of) {
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
        visit_keys(r.table[tile.entry], r.space, tile.begin, tile.end, [&](auto key_of) {
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

// Pass 1 of a selection over the tiles of `r` and what it settles: the threshold itself (NaN
// weights, k == 0, the zero fast path), or the bucket of high key bits that holds it and the
// threshold's rank inside that bucket.
struct FirstPass {
    Threshold result; // the threshold when `settled`
    bool settled = true;
    Bucket bucket{0, 0};
    int64_t rank = 0;
    int64_t in_bucket = 0;
};

// Keys have `bits` bits and NaNs are the keys above `inf`. k == 0 still scans once so NaNs are
// always reported.
FirstPass first_pass(const KeyRange &r, int64_t k, int bits, uint32_t inf) {
    FirstPass p;
    const int low_bits = bits > 16 ? bits - 16 : 0;
    std::vector<int64_t> zeros(r.tiles->size(), 0);
    const HighDigitHistogram counts(r, low_bits, 1u << (bits - low_bits), zeros.data());

    const uint32_t inf_bucket = inf >> low_bits;
    if (low_bits > 0 && counts[inf_bucket] > 0)
        p.result.nan_count = count_above(r, inf); // the infinity bucket also holds small NaN payloads
    else
        p.result.nan_count = counts.count_above(inf_bucket);
    if (p.result.nan_count > 0 || k == 0)
        return p;
    // Zero fast path: the weights already hold at least k pruned zeros (the steady state of a
    // constant sparsity), so T = 0 and the k-th zero in index order is found from the counts.
    int64_t zero_count = 0;
    for (int64_t z : zeros)
        zero_count += z;
    if (k <= zero_count) {
        p.result.index = locate_tie(r, 0, k, zeros);
        return p;
    }
    p.settled = false;
    p.rank = k;
    p.bucket = Bucket{find_bucket(counts, counts.bins(), p.rank), low_bits};
    p.in_bucket = counts[p.bucket.prefix];
    return p;
}

// Whether the bucket's composites fit the candidate buffer; if not (heavy ties), more passes.
bool bucket_fits(const FirstPass &p, int64_t total) { return p.in_bucket <= std::max(kMinCandidates, total / 64); }

// The threshold from the composites of the whole bucket; afterwards its first `rank` composites
// are the bucket's pruned elements.
Threshold threshold_of(std::vector<uint64_t> &candidates, const FirstPass &p) {
    std::nth_element(candidates.begin(), candidates.begin() + (p.rank - 1), candidates.end());
    const uint64_t c = candidates[p.rank - 1];
    Threshold t;
    t.key = (p.bucket.prefix << p.bucket.low_bits) | static_cast<uint32_t>(c >> kIndexBits);
    t.index = static_cast<int64_t>(c & kIndexMask);
    return t;
}

// The rest of the selection after pass 1.
Threshold resolve(const KeyRange &r, FirstPass &p, int64_t total) {
    if (p.settled)
        return p.result;
    const int low_bits = p.bucket.low_bits;
    uint32_t key = p.bucket.prefix;
    if (low_bits > 0) {
        if (bucket_fits(p, total)) {
            std::vector<uint64_t> candidates = gather_bucket(r, low_bits, p.bucket.prefix, p.in_bucket);
            return threshold_of(candidates, p);
        }
        const std::vector<uint64_t> low = bucket_histogram(r, 1u << low_bits, low_bits, p.bucket.prefix);
        key = (p.bucket.prefix << low_bits) | find_bucket(low, static_cast<uint32_t>(low.size()), p.rank);
    }
    Threshold result;
    result.key = key;
    result.index = find_tie(r, key, p.rank);
    return result;
}

// k-th smallest (key, global index) over all tiles of `r`.
Threshold select_tiles(const KeyRange &r, int64_t total, int64_t k, int bits, uint32_t inf) {
    FirstPass p = first_pass(r, k, bits, inf);
    return resolve(r, p, total);
}

// The prune step's second and last read when the bucket fits: one build pass over the tiles
// settles every element outside the bucket and gathers the bucket's composites; the threshold
// comes from those, and its pruned composites are cleared and zeroed. `bases` maps the range's
// order back to the entries of `table` (n of them).
Threshold prune_around_bucket(const KeyRange &r, const FirstPass &p, const TensorEntry *table, const int64_t *bases,
                              int64_t n) {
    const auto &tiles = *r.tiles;
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    const int nt = threads_for(r.num_threads, num_tiles * kTileElems);
    std::vector<std::vector<uint64_t>> parts(nt);
    parallel_for(nt, num_tiles, [&](int64_t t, int thread) {
        const Tile &tile = tiles[t];
        build_tile_around_bucket(table[tile.entry], r.space, p.bucket, tile.begin, tile.end, tile.base, parts[thread]);
    });
    std::vector<uint64_t> candidates;
    candidates.reserve(static_cast<size_t>(p.in_bucket));
    for (auto &part : parts) {
        candidates.insert(candidates.end(), part.begin(), part.end());
        std::vector<uint64_t>().swap(part);
    }
    const Threshold t = threshold_of(candidates, p);
    prune_composites(table, bases, n, candidates.data(), p.rank, nt);
    return t;
}

Threshold select_small(const TensorEntry &entry, int64_t k) {
    std::vector<uint64_t> composites(static_cast<size_t>(entry.numel));
    const uint32_t inf = inf_key(static_cast<int32_t>(entry.dtype), entry_key_space(entry, kNative));
    Threshold result;
    int64_t zeros = 0;
    visit_keys(entry, kNative, 0, entry.numel, [&](auto key_of) {
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

void check_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, const Selection *out, bool needs_mask) {
    check_table(table, n, needs_mask);
    GMP_CHECK(n == 0 || (k != nullptr && out != nullptr), "k and out pointers must not be null");
    for (int64_t e = 0; e < n; ++e)
        check_k(k[e], table[e].numel, e);
}

// Calls f(e, threads) for every entry. Entries holding more than 1/(2 * threads) of the elements
// are done by all threads together (a few parallel regions each); all others in one region, each
// by one thread from the largest down, so a step runs few regions and a thread held back by the
// OS delays one entry while the others take the rest.
template <typename F> void for_each_entry(const TensorEntry *table, int64_t n, int num_threads, F &&f) {
    const int64_t total = total_numel(table, n);
    const int nt = threads_for(num_threads, total);
    std::vector<int64_t> order(static_cast<size_t>(n));
    for (int64_t e = 0; e < n; ++e)
        order[e] = e;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return table[a].numel > table[b].numel; });
    size_t shared = 0;
    while (shared < order.size() && nt > 1 && table[order[shared]].numel * 2 * nt > total)
        f(order[shared++], nt);
    parallel_for(nt, static_cast<int64_t>(order.size() - shared), [&](int64_t i, int) { f(order[shared + i], 1); });
}

// A per-layer row: native keys, or wide ones for a scaled entry.
Selection entry_row(const TensorEntry &entry, const Threshold &t) {
    return Selection{static_cast<int64_t>(t.key), t.index, entry_key_space(entry, kNative), t.nan_count};
}

// The tiles of one entry above kSmallEntry elements and its key width (not copyable: `range`
// points at `tiles`).
struct EntryRange {
    std::vector<Tile> tiles;
    KeyRange range;
    int bits;
    uint32_t inf;
    EntryRange(const TensorEntry &entry, int threads)
        : tiles(make_tiles(&entry, 1)), range{&entry, &tiles, entry_key_space(entry, kNative), threads},
          bits(key_bits(static_cast<int32_t>(entry.dtype), range.space)),
          inf(inf_key(static_cast<int32_t>(entry.dtype), range.space)) {}
    EntryRange(const EntryRange &) = delete;
    EntryRange &operator=(const EntryRange &) = delete;
};

// The checked arguments of a global selection, its tiles and key width (not copyable).
struct GlobalRange {
    std::vector<Tile> tiles;
    KeyRange range;
    int64_t total;
    int bits = 0;
    uint32_t inf = 0;
    GlobalRange(const TensorEntry *table, int64_t n, int64_t k, int32_t key_space, const Selection *out,
                int num_threads, bool needs_mask) {
        check_table(table, n, needs_mask);
        GMP_CHECK(n == 0 || out != nullptr, "out pointer must not be null");
        GMP_CHECK(key_space == kNative || key_space == kWide, "unknown key space ", key_space);
        total = total_numel(table, n);
        check_k(k, total, -1);
        GMP_CHECK(total <= int64_t(kIndexMask), "global selection supports at most 2^49 elements, got ", total);
        const int32_t dtype = n > 0 ? static_cast<int32_t>(table[0].dtype) : kFloat32;
        for (int64_t e = 0; e < n; ++e)
            GMP_CHECK(key_space == kWide || table[e].dtype == dtype,
                      "the native key space needs one dtype for all entries; entry ", e, " differs");
        check_scaled_space(table, n, key_space);
        tiles = make_tiles(table, n);
        range = KeyRange{table, &tiles, key_space, num_threads};
        bits = key_bits(dtype, key_space);
        inf = inf_key(dtype, key_space);
    }
    GlobalRange(const GlobalRange &) = delete;
    GlobalRange &operator=(const GlobalRange &) = delete;
};

// Translates the global (key, index) into each entry's flat index: entries wholly before the
// threshold element prune all their ties, entries after it prune none.
void write_global_rows(const TensorEntry *table, int64_t n, int32_t key_space, const Threshold &t, Selection *out) {
    int64_t base = 0;
    for (int64_t e = 0; e < n; ++e) {
        const int64_t numel = table[e].numel;
        const int64_t local = std::clamp<int64_t>(t.index - base, -1, numel - 1);
        out[e] = Selection{static_cast<int64_t>(t.key), t.index < 0 ? -1 : local, key_space, t.nan_count};
        base += numel;
    }
}

} // namespace

void select_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, int num_threads) {
    check_layerwise(table, n, k, out, false);
    for_each_entry(table, n, num_threads, [&](int64_t e, int threads) {
        if (table[e].numel <= kSmallEntry) {
            out[e] = entry_row(table[e], select_small(table[e], k[e]));
            return;
        }
        Threshold t;
        if (!select_by_sample(&table[e], 1, k[e], kNative, threads, t.key, t.index)) {
            const EntryRange er(table[e], threads);
            t = select_tiles(er.range, table[e].numel, k[e], er.bits, er.inf);
        }
        out[e] = entry_row(table[e], t);
    });
}

void prune_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, int num_threads) {
    check_layerwise(table, n, k, out, true);
    for_each_entry(table, n, num_threads, [&](int64_t e, int threads) {
        const TensorEntry &entry = table[e];
        if (entry.numel <= kSmallEntry) {
            out[e] = entry_row(entry, select_small(entry, k[e]));
            build_tile(entry, out[e], 0, entry.numel, true);
            return;
        }
        const EntryRange er(entry, threads);
        Threshold t;
        if (!select_by_sample(&entry, 1, k[e], kNative, threads, t.key, t.index)) {
            FirstPass p = first_pass(er.range, k[e], er.bits, er.inf);
            if (!p.settled && bucket_fits(p, entry.numel)) {
                const int64_t base = 0;
                out[e] = entry_row(entry, prune_around_bucket(er.range, p, &entry, &base, 1));
                return;
            }
            t = resolve(er.range, p, entry.numel);
        }
        out[e] = entry_row(entry, t);
        parallel_for(threads, static_cast<int64_t>(er.tiles.size()),
                     [&](int64_t i, int) { build_tile(entry, out[e], er.tiles[i].begin, er.tiles[i].end, true); });
    });
}

void select_global(const TensorEntry *table, int64_t n, int64_t k, int32_t key_space, Selection *out, int num_threads) {
    const GlobalRange g(table, n, k, key_space, out, num_threads, false);
    Threshold t;
    if (!select_by_sample(table, n, k, key_space, num_threads, t.key, t.index))
        t = select_tiles(g.range, g.total, k, g.bits, g.inf);
    write_global_rows(table, n, key_space, t, out);
}

void prune_global(const TensorEntry *table, int64_t n, int64_t k, int32_t key_space, Selection *out, int num_threads) {
    const GlobalRange g(table, n, k, key_space, out, num_threads, true);
    Threshold t;
    if (!select_by_sample(table, n, k, key_space, num_threads, t.key, t.index)) {
        FirstPass p = first_pass(g.range, k, g.bits, g.inf);
        if (!p.settled && bucket_fits(p, g.total)) {
            std::vector<int64_t> bases(static_cast<size_t>(n));
            for (int64_t e = 0, base = 0; e < n; base += table[e++].numel)
                bases[e] = base;
            write_global_rows(table, n, key_space, prune_around_bucket(g.range, p, table, bases.data(), n), out);
            return;
        }
        t = resolve(g.range, p, g.total);
    }
    write_global_rows(table, n, key_space, t, out);
    parallel_for(threads_for(num_threads, g.total), static_cast<int64_t>(g.tiles.size()), [&](int64_t i, int) {
        const Tile &tile = g.tiles[i];
        build_tile(table[tile.entry], out[tile.entry], tile.begin, tile.end, true);
    });
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

} // namespace gmp::cpu
