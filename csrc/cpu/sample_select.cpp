// Sample select (Alabi et al., "Fast k-selection algorithms for graphics processing units", ACM
// JEA 2012): the keys of a sample of the entry bracket its k-th smallest key; one read then
// counts the keys below the bracket and gathers those inside it as (key << 32 | index)
// composites, and the k-th of these is the exact (key, index). The read costs a few vector
// compares per element, where the histogram select's first pass costs a memory increment each;
// on the ResNet-50 set one thread selected per layer in ~21 ms this way against ~30-40 ms.
// When the bracket misses the k-th key (about 1 entry in 400 at 3 standard errors) nothing was
// decided and the caller runs the histogram select: one read more.
// Only fp32 entries on CPUs with AVX2 take this path (the 8-lane compares are what make the
// read cheap); 16-bit keys settle in the histogram's single 32K-bin pass.
#include "../ops.h"
#include "cpu_common.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace gmp::cpu {
namespace {

constexpr int64_t kSampleStride = 64; // one sampled element per this many
constexpr int64_t kSampleRun = 8;     // consecutive elements per sampled run
constexpr int64_t kMinSample = 1024;
constexpr int64_t kMaxSample = int64_t(1) << 13;
constexpr double kBracketSigmas = 3.0; // half-width of the bracket, in standard errors of its rank
constexpr int64_t kMinCandidateCap = int64_t(1) << 12;
constexpr uint32_t kMagnitude = 0x7fffffffu;

// The key bracket [lo, hi] (inclusive) that holds the k-th smallest key with high probability, and
// how many elements it is expected to hold.
struct Bracket {
    uint32_t lo;
    uint32_t hi;
    int64_t expected;
};

// Keys of m elements (m a multiple of kSampleRun): runs of kSampleRun consecutive elements, one
// run from each of m / kSampleRun equal strides at a hashed offset. A run shares its cache lines;
// hashed offsets, because weight layouts repeat with strides of their own (kernel taps, heads)
// that a fixed offset could sample one kind of element of.
std::vector<uint32_t> sample_keys(const uint32_t *bits, int64_t n, int64_t m) {
    std::vector<uint32_t> keys(static_cast<size_t>(m));
    const int64_t runs = m / kSampleRun;
    const int64_t stride = n / runs; // >= kSampleRun
    const auto span = static_cast<uint64_t>(stride - kSampleRun + 1);
    for (int64_t r = 0; r < runs; ++r) {
        const uint64_t hash = (uint64_t(r) * 0x9E3779B97F4A7C15ull) >> 32; // 32 well-mixed bits
        const uint32_t *run = bits + r * stride + static_cast<int64_t>((hash * span) >> 32);
        for (int64_t j = 0; j < kSampleRun; ++j)
            keys[r * kSampleRun + j] = run[j] & kMagnitude;
    }
    return keys;
}

// The bracket around the sample's k/n quantile, or false when the sample shows NaN or zeros in it
// (the steady state of a pruned entry: the zero fast path serves it) or ties that would make it
// hold more than `cap` elements. Its half-width is kBracketSigmas standard errors of the
// quantile's rank, measured from the spread between runs: neighbouring weights share a filter's
// or a row's scale, so a run's elements are not independent and the binomial error (the floor
// here) would be too small.
bool choose_bracket(std::vector<uint32_t> &sample, int64_t n, int64_t k, int64_t cap, Bracket &bracket) {
    const auto m = static_cast<int64_t>(sample.size());
    const uint32_t inf = inf_key(kFloat32, kNative);
    for (uint32_t key : sample)
        if (key > inf)
            return false;
    const double q = static_cast<double>(k) / static_cast<double>(n);
    const double centre = q * static_cast<double>(m);
    const int64_t centre_rank = std::min(static_cast<int64_t>(centre), m - 1);
    std::vector<uint32_t> sorted_part(sample); // nth_element reorders; the runs are read below
    std::nth_element(sorted_part.begin(), sorted_part.begin() + centre_rank, sorted_part.end());
    const uint32_t centre_key = sorted_part[centre_rank];
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
        std::nth_element(sorted_part.begin(), sorted_part.begin() + lo_rank, sorted_part.begin() + centre_rank);
        bracket.lo = sorted_part[lo_rank];
    }
    if (hi_rank < m) {
        std::nth_element(sorted_part.begin() + centre_rank + 1, sorted_part.begin() + hi_rank, sorted_part.end());
        bracket.hi = sorted_part[hi_rank];
    }
    int64_t inside = 0;
    for (uint32_t key : sample)
        inside += key >= bracket.lo && key <= bracket.hi;
    bracket.expected = inside * n / m;
    return bracket.lo > 0 && bracket.expected <= cap;
}

// What one read against a bracket finds.
struct BracketRead {
    int64_t below = 0; // keys < lo
    bool nan = false;  // any key above the infinity key
};

// Scalar read of elements [first, n).
void read_tail(const uint32_t *bits, int64_t first, int64_t n, const Bracket &b, BracketRead &read,
               std::vector<uint64_t> &candidates) {
    const uint32_t inf = inf_key(kFloat32, kNative);
    for (int64_t i = first; i < n; ++i) {
        const uint32_t key = bits[i] & kMagnitude;
        read.below += key < b.lo;
        read.nan |= key > inf;
        if (key >= b.lo && key <= b.hi)
            candidates.push_back((uint64_t(key) << 32) | uint64_t(i));
    }
}

#ifdef GMP_HAVE_AVX2_DISPATCH
// Per 8 keys: three compares, a lane count of keys >= lo, a lane OR of NaNs and one movemask of
// the keys inside the bracket, whose few set bits are gathered. Keys < 2^31, so signed compares
// are exact; lo >= 1.
__attribute__((target("avx2"))) BracketRead read_bracket(const uint32_t *bits, int64_t n, const Bracket &b,
                                                         std::vector<uint64_t> &candidates) {
    const __m256i magnitude = _mm256_set1_epi32(static_cast<int32_t>(kMagnitude));
    const __m256i below_lo = _mm256_set1_epi32(static_cast<int32_t>(b.lo - 1));
    const __m256i hi = _mm256_set1_epi32(static_cast<int32_t>(b.hi));
    const __m256i inf = _mm256_set1_epi32(static_cast<int32_t>(inf_key(kFloat32, kNative)));
    __m256i from_lo = _mm256_setzero_si256(); // per lane, minus the count of keys >= lo
    __m256i nan = _mm256_setzero_si256();
    int64_t first = 0;
    for (; first + 64 <= n; first += 64) {
        uint64_t inside = 0;
        for (int q = 0; q < 8; ++q) {
            const auto *p = reinterpret_cast<const __m256i *>(bits + first) + q;
            const __m256i keys = _mm256_and_si256(_mm256_loadu_si256(p), magnitude);
            const __m256i at_least_lo = _mm256_cmpgt_epi32(keys, below_lo);
            from_lo = _mm256_add_epi32(from_lo, at_least_lo);
            nan = _mm256_or_si256(nan, _mm256_cmpgt_epi32(keys, inf));
            const __m256i in = _mm256_andnot_si256(_mm256_cmpgt_epi32(keys, hi), at_least_lo);
            inside |= uint64_t(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(in)))) << (8 * q);
        }
        for (; inside != 0; inside &= inside - 1) {
            const int64_t i = first + __builtin_ctzll(inside);
            candidates.push_back((uint64_t(bits[i] & kMagnitude) << 32) | uint64_t(i));
        }
    }
    // Each lane counted at most n / 8 < 2^29 keys.
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i *>(lanes), from_lo);
    BracketRead read;
    read.below = first;
    for (int32_t lane : lanes)
        read.below += lane;
    read.nan = !_mm256_testz_si256(nan, nan);
    read_tail(bits, first, n, b, read, candidates);
    return read;
}
#endif

// The rank-th smallest (1-based) of the candidates, whose keys lie in [lo, hi]: one count of
// their keys' offsets from lo in at most kCandidateBins bins (an L1-sized table), then
// nth_element over the bin that holds it. nth_element over all candidates cost ~3x as much.
uint64_t select_candidate(const std::vector<uint64_t> &candidates, int64_t rank, uint32_t lo, uint32_t hi) {
    constexpr uint32_t kCandidateBins = 2048;
    int shift = 0;
    while (((hi - lo) >> shift) >= kCandidateBins)
        ++shift;
    std::vector<uint32_t> counts(kCandidateBins, 0);
    for (uint64_t c : candidates)
        ++counts[(static_cast<uint32_t>(c >> 32) - lo) >> shift];
    uint32_t bin = 0;
    for (; counts[bin] < rank; ++bin)
        rank -= counts[bin];
    std::vector<uint64_t> in_bin;
    in_bin.reserve(counts[bin]);
    for (uint64_t c : candidates)
        if (((static_cast<uint32_t>(c >> 32) - lo) >> shift) == bin)
            in_bin.push_back(c);
    std::nth_element(in_bin.begin(), in_bin.begin() + (rank - 1), in_bin.end());
    return in_bin[rank - 1];
}

} // namespace

bool select_by_sample(const TensorEntry &entry, int64_t k, uint32_t &key, int64_t &index) {
#ifdef GMP_HAVE_AVX2_DISPATCH
    const int64_t n = entry.numel;
    if (!have_avx2() || entry.dtype != kFloat32 || n > int64_t(UINT32_MAX) || n < kMinSample)
        return false;
    const auto *bits = reinterpret_cast<const uint32_t *>(entry.data);
    const int64_t m = std::clamp(n / kSampleStride, kMinSample, kMaxSample) / kSampleRun * kSampleRun;
    std::vector<uint32_t> sample = sample_keys(bits, n, m);
    Bracket bracket{};
    if (!choose_bracket(sample, n, k, std::max(n / 8, kMinCandidateCap), bracket))
        return false;
    std::vector<uint64_t> candidates;
    candidates.reserve(static_cast<size_t>(bracket.expected + bracket.expected / 4 + 64));
    const BracketRead read = read_bracket(bits, n, bracket, candidates);
    const int64_t rank = k - read.below; // of the k-th key among the candidates, 1-based
    if (read.nan || rank < 1 || rank > static_cast<int64_t>(candidates.size()))
        return false;
    const uint64_t kth = select_candidate(candidates, rank, bracket.lo, bracket.hi);
    key = static_cast<uint32_t>(kth >> 32);
    index = static_cast<int64_t>(kth & 0xffffffffu);
    return true;
#else
    (void)entry;
    (void)k;
    (void)key;
    (void)index;
    return false;
#endif
}

} // namespace gmp::cpu
