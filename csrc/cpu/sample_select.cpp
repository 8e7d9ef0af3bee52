// Sample select (Alabi et al., "Fast k-selection algorithms for graphics processing units", ACM
// JEA 2012): the keys of a sample of the selection's elements (one entry, or all entries in
// global order) bracket its k-th smallest key; one read then counts the keys below the bracket
// and gathers those inside it as ((key - lo) << index bits | index) composites, and the k-th of
// these is the exact (key, index). The read costs a few vector compares per element, where the
// histogram select's first pass costs a memory increment each: on the ResNet-50 set the per-layer
// prune step went from 2.3-3.3 to 1.5-2.2 read passes (benchmarks/README.md).
// When the bracket misses the k-th key (about 1 selection in 370 at 3 standard errors) nothing
// was decided and the caller runs the histogram select: one read more.
// Extra memory: the sample (at most 64K keys) and the candidates: a bracket expected to hold more
// than 1/8 of the elements (above ~4.8M elements: 2^19 + 1/64 of them) is not read.
// CPUs with AVX2 take this path (the 8- and 16-lane compares are what make the read cheap) for
// fp32 and scaled entries (whose keys are fp32 products), and for entries of one 16-bit dtype
// ranked by native keys, where it replaces the histogram's single 32K-bin pass.
#include "../ops.h"
#include "cpu_common.h"
#include "row_scaled_keys.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace gmp::cpu {
#ifdef GMP_HAVE_AVX2_DISPATCH
namespace {

constexpr int64_t kSampleRun = 8; // consecutive elements per sampled run
constexpr int64_t kMinSample = 1024;
constexpr int64_t kMaxSample = int64_t(1) << 16;
constexpr double kBracketSigmas = 3.0; // half-width of the bracket, in standard errors of its rank
constexpr int64_t kMinCandidateCap = int64_t(1) << 12;
constexpr uint32_t kCandidateBins = 2048; // of the candidates' key offsets: an L1-sized count
constexpr int64_t kPrefetchRuns = 16;     // sampled runs in flight: their reads are cache misses

// Sample size for n elements: the power of two nearest below (0.3 n)^(2/3), which balances the
// sample's cost (~12 ns a key to gather and rank) against the candidates' (~4 ns each; a bracket
// of 3 standard errors holds about 1.8 n / sqrt(m) of them at 90% sparsity).
int64_t sample_size(int64_t n) {
    int64_t m = kMinSample;
    const double nn = static_cast<double>(n);
    while (m < kMaxSample && 100.0 * std::pow(2.0 * static_cast<double>(m), 3) <= 9.0 * nn * nn)
        m *= 2;
    return m;
}

// The most candidates a bracket may hold before the histogram select is cheaper.
int64_t candidate_cap(int64_t n) { return std::max(kMinCandidateCap, std::min(n / 8, (int64_t(1) << 19) + n / 64)); }

// The selection's elements: entries [0, n) of a table, in order, either all fp32 or scaled
// (`dtype` kFloat32: 31-bit keys) or all bf16 or all fp16 by native keys (`dtype`: 15-bit keys).
struct Elements {
    const TensorEntry *table;
    int64_t n;
    int64_t total;
    int32_t dtype;
};

// The key bracket [lo, hi] (inclusive) that holds the k-th smallest key with high probability,
// how many elements it is expected to hold, and how the composites of those split their 64 bits.
struct Bracket {
    uint32_t lo;
    uint32_t hi;
    int64_t expected;
    int index_bits; // composite = (key - lo) << index_bits | index
    int bin_shift;  // a candidate's bin: (key - lo) >> bin_shift, below kCandidateBins
};

// The composites one thread gathered and the count of their bins, made in the same read, so the
// k-th candidate's bin is known without another pass over them.
struct Candidates {
    std::vector<uint64_t> composites;
    std::vector<int64_t> bin_counts = std::vector<int64_t>(kCandidateBins, 0);
};

// Keys of elements [first, first + count) of the entry into out.
void read_keys(const TensorEntry &entry, int64_t first, int64_t count, uint32_t *out) {
    if (entry.scale != 0) {
        scaled_keys(entry, first, first + count, out);
        return;
    }
    if (entry.dtype != kFloat32) {
        const auto *bits = reinterpret_cast<const uint16_t *>(entry.data);
        for (int64_t j = 0; j < count; ++j)
            out[j] = bits[first + j] & 0x7fffu;
        return;
    }
    const auto *bits = reinterpret_cast<const uint32_t *>(entry.data);
    for (int64_t j = 0; j < count; ++j)
        out[j] = bits[first + j] & kMagnitude;
}

// Keys of m elements (m a multiple of kSampleRun): runs of kSampleRun consecutive elements in
// the selection's order, one run from each of m / kSampleRun equal strides at a hashed offset.
// A run shares its cache lines; hashed offsets, because weight layouts repeat with strides of
// their own (kernel taps, heads) that a fixed offset could sample one kind of element of.
// Runs are prefetched kPrefetchRuns ahead of their reads: read one at a time, each waited for
// its cache miss (~0.7 ms for 8K runs).
std::vector<uint32_t> sample_keys(const Elements &el, int64_t m) {
    std::vector<uint32_t> keys(static_cast<size_t>(m));
    const int64_t runs = m / kSampleRun;
    const int64_t stride = el.total / runs; // >= kSampleRun
    const auto span = static_cast<uint64_t>(stride - kSampleRun + 1);
    const auto run_start = [&](int64_t r) {
        const uint64_t hash = (uint64_t(r) * 0x9E3779B97F4A7C15ull) >> 32; // 32 well-mixed bits
        return r * stride + static_cast<int64_t>((hash * span) >> 32);
    };
    int64_t ahead_entry = 0;
    int64_t ahead_base = 0; // of entry ahead_entry
    const auto prefetch = [&](int64_t r) {
        const int64_t start = run_start(r);
        while (start >= ahead_base + el.table[ahead_entry].numel)
            ahead_base += el.table[ahead_entry++].numel;
        const TensorEntry &entry = el.table[ahead_entry];
        const int64_t size = dtype_size(static_cast<int32_t>(entry.dtype));
        const auto *first = reinterpret_cast<const char *>(entry.data) + (start - ahead_base) * size;
        __builtin_prefetch(first);
        __builtin_prefetch(first + (std::min(kSampleRun, entry.numel - (start - ahead_base)) - 1) * size);
    };
    for (int64_t r = 0; r < std::min(kPrefetchRuns, runs); ++r)
        prefetch(r);
    int64_t e = 0;
    int64_t base = 0; // of entry e
    for (int64_t r = 0; r < runs; ++r) {
        if (r + kPrefetchRuns < runs)
            prefetch(r + kPrefetchRuns);
        const int64_t start = run_start(r);
        for (int64_t j = 0; j < kSampleRun;) { // a run may cross into the next entries
            while (start + j >= base + el.table[e].numel)
                base += el.table[e++].numel;
            const int64_t count = std::min(kSampleRun - j, base + el.table[e].numel - (start + j));
            read_keys(el.table[e], start + j - base, count, &keys[r * kSampleRun + j]);
            j += count;
        }
    }
    return keys;
}

// The bracket around the sample's k/total quantile, or false when the sample shows NaN or zeros in
// it (the steady state of pruned weights: the zero fast path serves it), ties that would make it
// hold more than `cap` elements, or more index and key-offset bits than a composite has. Its
// half-width is kBracketSigmas standard errors of the quantile's rank, measured from the spread
// between runs: neighbouring weights share a filter's or a row's scale, so a run's elements are
// not independent and the binomial error (the floor here) would be too small.
bool choose_bracket(std::vector<uint32_t> &sample, int64_t total, int64_t k, int64_t cap, uint32_t inf,
                    Bracket &bracket) {
    const auto m = static_cast<int64_t>(sample.size());
    for (uint32_t key : sample)
        if (key > inf)
            return false;
    const double q = static_cast<double>(k) / static_cast<double>(total);
    const double centre = q * static_cast<double>(m);
    const int64_t centre_rank = std::min(static_cast<int64_t>(centre), m - 1);
    std::vector<uint32_t> ranked(sample); // nth_element reorders; the runs are read below
    std::nth_element(ranked.begin(), ranked.begin() + centre_rank, ranked.end());
    const uint32_t centre_key = ranked[centre_rank];
    double sum = 0;
    double sum_squares = 0;
    for (int64_t r = 0; r < m; r += kSampleRun) {
        double below = 0;
        for (int64_t j = r; j < r + kSampleRun; ++j)
            below += sample[j] < centre_key;
        sum += below;
        sum_squares += below * below;
    }
    const double runs = static_cast<double>(m / kSampleRun);
    const double run_variance = std::max(0.0, (sum_squares - sum * sum / runs) / (runs - 1));
    const double rank_error = std::sqrt(std::max(runs * run_variance, centre * (1 - q)));
    const double spread = kBracketSigmas * rank_error + 1;
    const auto lo_rank = static_cast<int64_t>(std::floor(centre - spread));
    const auto hi_rank = static_cast<int64_t>(std::ceil(centre + spread));
    bracket.lo = 0;
    bracket.hi = inf;
    if (lo_rank >= 0) {
        std::nth_element(ranked.begin(), ranked.begin() + lo_rank, ranked.begin() + centre_rank);
        bracket.lo = ranked[lo_rank];
    }
    if (hi_rank < m) {
        std::nth_element(ranked.begin() + centre_rank + 1, ranked.begin() + hi_rank, ranked.end());
        bracket.hi = ranked[hi_rank];
    }
    int64_t inside = 0;
    for (uint32_t key : sample)
        inside += key >= bracket.lo && key <= bracket.hi;
    bracket.expected = inside * total / m;
    const int offset_bits = 64 - __builtin_clzll(uint64_t(bracket.hi - bracket.lo) | 1);
    bracket.index_bits = 64 - offset_bits;
    bracket.bin_shift = 0;
    while (((bracket.hi - bracket.lo) >> bracket.bin_shift) >= kCandidateBins)
        ++bracket.bin_shift;
    return bracket.lo > 0 && bracket.expected <= cap && total <= (int64_t(1) << std::min(bracket.index_bits, 62));
}

// What one read against a bracket finds.
struct BracketRead {
    int64_t below = 0; // keys < lo
    bool nan = false;  // any key above the infinity key
};

// Adds the candidate of `key` (in the bracket) at `index` in the selection's order.
inline void gather(Candidates &candidates, const Bracket &b, uint32_t key, int64_t index) {
    candidates.composites.push_back((uint64_t(key - b.lo) << b.index_bits) | uint64_t(index));
    ++candidates.bin_counts[(key - b.lo) >> b.bin_shift];
}

// Adds to `read` what the lanes of a bracket read counted over `counted` elements: each lane
// (Lane: 32-bit for 8 of them, 16-bit for 16) holds minus its count of keys >= lo; a nonzero
// lane of `nan` saw a NaN.
template <typename Lane>
__attribute__((target("avx2"))) void add_lanes(const __m256i &from_lo, const __m256i &nan, int64_t counted,
                                               BracketRead &read) {
    alignas(32) Lane lanes[32 / sizeof(Lane)];
    _mm256_store_si256(reinterpret_cast<__m256i *>(lanes), from_lo);
    read.below += counted;
    for (Lane lane : lanes)
        read.below += lane;
    read.nan |= !_mm256_testz_si256(nan, nan);
}

// Keys for the bracket read, 8 at a time (AVX2) and one at a time: the weights' own bits less the
// sign. start_block(first) comes before the keys of elements [first, first + 64) are read.
struct RawKeys {
    const uint32_t *bits;

    void start_block(int64_t) {}
    __attribute__((target("avx2"))) __m256i load8(int64_t i) const {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(bits + i));
        return _mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int32_t>(kMagnitude)));
    }
    uint32_t at(int64_t i) const { return bits[i] & kMagnitude; }
};

// Reads elements [begin, end) of an entry (begin a multiple of 64) against the bracket. Per 8
// keys: three compares, a lane count of keys >= lo, a lane OR of NaNs and one movemask of the
// keys inside the bracket, whose few set bits are gathered. Keys < 2^31, so signed compares are
// exact; lo >= 1.
template <typename Keys>
__attribute__((target("avx2"))) void read_bracket(Keys keys, int64_t begin, int64_t end, int64_t base, const Bracket &b,
                                                  BracketRead &read, Candidates &candidates) {
    const __m256i below_lo = _mm256_set1_epi32(static_cast<int32_t>(b.lo - 1));
    const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(b.hi));
    const uint32_t inf_scalar = inf_key(kFloat32, kNative);
    const __m256i inf = _mm256_set1_epi32(static_cast<int32_t>(inf_scalar));
    __m256i from_lo = _mm256_setzero_si256(); // per lane, minus the count of keys >= lo
    __m256i nan = _mm256_setzero_si256();
    int64_t first = begin;
    for (; first + 64 <= end; first += 64) {
        keys.start_block(first);
        uint64_t inside = 0;
        for (int q = 0; q < 8; ++q) {
            const __m256i key = keys.load8(first + 8 * q);
            const __m256i at_least_lo = _mm256_cmpgt_epi32(key, below_lo);
            from_lo = _mm256_add_epi32(from_lo, at_least_lo);
            nan = _mm256_or_si256(nan, _mm256_cmpgt_epi32(key, inf));
            const __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(key, hi), at_least_lo);
            inside |= uint64_t(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(in)))) << (8 * q);
        }
        for (; inside != 0; inside &= inside - 1) {
            const int64_t i = first + __builtin_ctzll(inside);
            gather(candidates, b, keys.at(i), base + i);
        }
    }
    add_lanes<int32_t>(from_lo, nan, first - begin, read); // a lane counted <= 64K / 8 keys of a tile
    if (first == end)
        return;
    keys.start_block(first); // the last, partial block, one key at a time
    for (int64_t i = first; i < end; ++i) {
        const uint32_t key = keys.at(i);
        read.below += key < b.lo;
        read.nan |= key > inf_scalar;
        if (key >= b.lo && key <= b.hi)
            gather(candidates, b, key, base + i);
    }
}

// read_bracket for 16-bit weights ranked by native keys (their bits less the sign, <= 0x7fff,
// so signed 16-bit compares are exact; lo >= 1): 16 keys a compare, and per two vectors one
// saturating pack of their lane masks into bytes (64-bit groups a0-7 b0-7 a8-15 b8-15, put in
// element order by a permute) for one movemask. A lane counts at most a tile's 64K / 16 keys.
__attribute__((target("avx2"))) void read_bracket16(const uint16_t *bits, uint32_t inf_scalar, int64_t begin,
                                                    int64_t end, int64_t base, const Bracket &b, BracketRead &read,
                                                    Candidates &candidates) {
    const __m256i below_lo = _mm256_set1_epi16(static_cast<int16_t>(b.lo - 1));
    const __m256i hi = _mm256_set1_epi16(static_cast<int16_t>(b.hi));
    const __m256i inf = _mm256_set1_epi16(static_cast<int16_t>(inf_scalar));
    const __m256i magnitude = _mm256_set1_epi16(0x7fff);
    __m256i from_lo = _mm256_setzero_si256(); // per lane, minus the count of keys >= lo
    __m256i nan = _mm256_setzero_si256();
    int64_t first = begin;
    for (; first + 64 <= end; first += 64) {
        uint64_t inside = 0;
        for (int q = 0; q < 4; q += 2) {
            __m256i in[2];
            for (int h = 0; h < 2; ++h) {
                const auto *p = reinterpret_cast<const __m256i *>(bits + first + 16 * (q + h));
                const __m256i key = _mm256_and_si256(_mm256_loadu_si256(p), magnitude);
                const __m256i at_least_lo = _mm256_cmpgt_epi16(key, below_lo);
                from_lo = _mm256_add_epi16(from_lo, at_least_lo);
                nan = _mm256_or_si256(nan, _mm256_cmpgt_epi16(key, inf));
                in[h] = _mm256_andnot_si256(_mm256_cmpgt_epi16(key, hi), at_least_lo);
            }
            const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(in[0], in[1]), 0xd8);
            inside |= uint64_t(static_cast<uint32_t>(_mm256_movemask_epi8(bytes))) << (16 * q);
        }
        for (; inside != 0; inside &= inside - 1) {
            const int64_t i = first + __builtin_ctzll(inside);
            gather(candidates, b, bits[i] & 0x7fffu, base + i);
        }
    }
    add_lanes<int16_t>(from_lo, nan, first - begin, read);
    for (int64_t i = first; i < end; ++i) { // the last, partial block
        const uint32_t key = bits[i] & 0x7fffu;
        read.below += key < b.lo;
        read.nan |= key > inf_scalar;
        if (key >= b.lo && key <= b.hi)
            gather(candidates, b, key, base + i);
    }
}

// Reads a tile against the bracket with the keys its entry has: its own bits, its rows' scaled
// keys in registers (fp32 and bf16 weights), or other scaled keys computed into a buffer first.
void read_tile(const TensorEntry &entry, const Tile &tile, const Bracket &b, BracketRead &read,
               Candidates &candidates) {
    if (entry.scale == 0 && entry.dtype != kFloat32) {
        read_bracket16(reinterpret_cast<const uint16_t *>(entry.data),
                       inf_key(static_cast<int32_t>(entry.dtype), kNative), tile.begin, tile.end, tile.base, b, read,
                       candidates);
    } else if (entry.scale == 0) {
        read_bracket(RawKeys{reinterpret_cast<const uint32_t *>(entry.data)}, tile.begin, tile.end, tile.base, b, read,
                     candidates);
    } else if (has_row_scaled_keys(entry) && entry.dtype == kFloat32) {
        read_bracket(RowScaledKeys<kFloat32>(entry, tile.begin), tile.begin, tile.end, tile.base, b, read, candidates);
    } else if (has_row_scaled_keys(entry)) {
        read_bracket(RowScaledKeys<kBFloat16>(entry, tile.begin), tile.begin, tile.end, tile.base, b, read, candidates);
    } else {
        read_bracket(RawKeys{scaled_range_keys(entry, tile.begin, tile.end)}, tile.begin, tile.end, tile.base, b, read,
                     candidates);
    }
}

// One read of all elements against the bracket: tiles handed out to `threads` threads, each
// gathering candidates of its own (composites are unique, so their order is free).
BracketRead read_elements(const Elements &el, const Bracket &b, int threads, std::vector<Candidates> &parts) {
    const std::vector<Tile> tiles = make_tiles(el.table, el.n);
    const int nt = threads_for(threads, el.total);
    std::vector<BracketRead> reads(static_cast<size_t>(nt));
    parts.resize(static_cast<size_t>(nt));
    for (auto &part : parts)
        part.composites.reserve(static_cast<size_t>((b.expected + b.expected / 4) / nt + 64));
    parallel_for(nt, static_cast<int64_t>(tiles.size()), [&](int64_t t, int thread) {
        const Tile &tile = tiles[t];
        read_tile(el.table[tile.entry], tile, b, reads[thread], parts[thread]);
    });
    BracketRead read;
    for (const BracketRead &part : reads) {
        read.below += part.below;
        read.nan |= part.nan;
    }
    return read;
}

// The rank-th smallest (1-based) of all threads' candidates, or nothing when rank is outside
// them (the bracket missed the k-th key): the bin of key offsets that holds it from the counts
// the read made, then nth_element over that bin's composites (over all candidates: ~3x the cost).
std::optional<uint64_t> select_candidate(const std::vector<Candidates> &parts, int64_t rank, const Bracket &b) {
    std::vector<int64_t> counts(kCandidateBins, 0);
    for (const Candidates &part : parts)
        for (uint32_t bin = 0; bin < kCandidateBins; ++bin)
            counts[bin] += part.bin_counts[bin];
    uint32_t bin = 0;
    for (; bin < kCandidateBins && counts[bin] < rank; ++bin)
        rank -= counts[bin];
    if (rank < 1 || bin == kCandidateBins)
        return std::nullopt;
    const int shift = b.index_bits + b.bin_shift; // a composite's bin is its value >> shift
    std::vector<uint64_t> in_bin;
    in_bin.reserve(static_cast<size_t>(counts[bin]));
    for (const Candidates &part : parts)
        for (uint64_t c : part.composites)
            if ((c >> shift) == bin)
                in_bin.push_back(c);
    std::nth_element(in_bin.begin(), in_bin.begin() + (rank - 1), in_bin.end());
    return in_bin[rank - 1];
}

// The keys' dtype (Elements::dtype) of entries [0, n) ranked in `key_space`, or -1 when they are
// neither all fp32 or scaled nor all of one 16-bit dtype, unscaled, in the native space.
int32_t keys_dtype(const TensorEntry *table, int64_t n, int32_t key_space) {
    bool keys32 = true;
    bool one16 = key_space == kNative && n > 0 && table[0].dtype != kFloat32;
    for (int64_t e = 0; e < n; ++e) {
        keys32 = keys32 && (table[e].dtype == kFloat32 || table[e].scale != 0);
        one16 = one16 && table[e].dtype == table[0].dtype && table[e].scale == 0;
    }
    return keys32 ? kFloat32 : one16 ? static_cast<int32_t>(table[0].dtype) : -1;
}

} // namespace

bool select_by_sample(const TensorEntry *table, int64_t n, int64_t k, int32_t key_space, int num_threads, uint32_t &key,
                      int64_t &index) {
    if (!have_avx2())
        return false;
    const Elements el{table, n, total_numel(table, n), keys_dtype(table, n, key_space)};
    if (el.dtype < 0 || k <= 0 || k > el.total || el.total < 2 * kMinSample)
        return false;
    std::vector<uint32_t> sample = sample_keys(el, sample_size(el.total));
    Bracket bracket{};
    if (!choose_bracket(sample, el.total, k, candidate_cap(el.total), inf_key(el.dtype, kNative), bracket))
        return false;
    std::vector<Candidates> candidates;
    const BracketRead read = read_elements(el, bracket, num_threads, candidates);
    if (read.nan)
        return false;
    // Of the k-th key among the candidates, 1-based.
    const std::optional<uint64_t> kth = select_candidate(candidates, k - read.below, bracket);
    if (!kth)
        return false;
    key = bracket.lo + static_cast<uint32_t>(*kth >> bracket.index_bits);
    index = static_cast<int64_t>(*kth & ((uint64_t(1) << bracket.index_bits) - 1));
    return true;
}
#else
bool select_by_sample(const TensorEntry *, int64_t, int64_t, int32_t, int, uint32_t &, int64_t &) { return false; }
#endif

} // namespace gmp::cpu
