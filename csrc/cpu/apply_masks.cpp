// Fused multi-tensor mask apply: one call zeroes the pruned elements of every table entry.
#include "../ops.h"
#include "cpu_common.h"

#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace gmp::cpu {
namespace {

// Every store below is skipped where it would write the bytes already there: in the steady state
// (pruned weights that hold their zeros) an apply then reads the weights and writes nothing, where
// stores of identical bytes would dirty every cache line and cost a write-back of the weights.

#if defined(__SSE2__)
// p[0..3] &= keep, unless that leaves them as they are.
inline void and_store(__m128i *p, __m128i keep) {
    const __m128i old = _mm_loadu_si128(p);
    const __m128i kept = _mm_and_si128(old, keep);
    if (_mm_movemask_epi8(_mm_cmpeq_epi32(kept, old)) != 0xffff)
        _mm_storeu_si128(p, kept);
}
#endif

// Clears the elements of 8 consecutive values whose bit in `byte` is 0: the byte is broadcast,
// each lane tests its own bit, and the result is an all-ones or all-zeros lane mask. SSE2 is
// part of x86-64, so this needs no runtime dispatch; other targets take the scalar loop.
inline void apply_byte(uint32_t *data, uint32_t byte) {
#if defined(__SSE2__)
    const __m128i low = _mm_setr_epi32(1, 2, 4, 8);
    const __m128i high = _mm_setr_epi32(16, 32, 64, 128);
    const __m128i b = _mm_set1_epi32(static_cast<int>(byte));
    auto *p = reinterpret_cast<__m128i *>(data);
    and_store(p, _mm_cmpeq_epi32(_mm_and_si128(b, low), low));
    and_store(p + 1, _mm_cmpeq_epi32(_mm_and_si128(b, high), high));
#else
    for (int j = 0; j < 8; ++j)
        if (!((byte >> j) & 1u) && data[j] != 0)
            data[j] = 0;
#endif
}

inline void apply_byte(uint16_t *data, uint32_t byte) {
#if defined(__SSE2__)
    const __m128i bits = _mm_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128);
    const __m128i b = _mm_set1_epi16(static_cast<short>(byte));
    and_store(reinterpret_cast<__m128i *>(data), _mm_cmpeq_epi16(_mm_and_si128(b, bits), bits));
#else
    for (int j = 0; j < 8; ++j)
        if (!((byte >> j) & 1u) && data[j] != 0)
            data[j] = 0;
#endif
}

// Whether the `count` elements from `data` are all +0.0 bits.
template <typename Bits> inline bool all_zero_bits(const Bits *data, int64_t count) {
    Bits any = 0;
    for (int64_t j = 0; j < count; ++j)
        any |= data[j];
    return any == 0;
}

// Clears the `count` (<= 64) elements from `data` whose bit in `word` is 0: an all-kept word
// stores nothing, an all-pruned one is one memset (none when its elements hold zeros already).
template <typename Bits> inline void apply_word_to(Bits *data, uint64_t word, int64_t count) {
    const uint64_t all = count == 64 ? ~uint64_t(0) : (uint64_t(1) << count) - 1;
    if ((word & all) == all)
        return;
    if ((word & all) == 0) {
        if (!all_zero_bits(data, count))
            std::memset(data, 0, static_cast<size_t>(count) * sizeof(Bits));
        return;
    }
    if (count == 64) {
        for (int byte = 0; byte < 8; ++byte)
            apply_byte(data + 8 * byte, static_cast<uint32_t>(word >> (8 * byte)) & 0xffu);
        return;
    }
    for (int64_t j = 0; j < count; ++j)
        if (!((word >> j) & 1u) && data[j] != 0)
            data[j] = 0;
}

// Clears the elements of one tile whose mask bit is 0, 64 at a time.
template <typename Bits> void apply_tile(Bits *data, const uint8_t *mask, int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += 64) {
        const int64_t count = std::min<int64_t>(64, end - first);
        uint64_t word = 0;
        std::memcpy(&word, mask + first / 8, static_cast<size_t>(ceil_div<int64_t>(count, 8)));
        apply_word_to(data + first, word, count);
    }
}

#ifdef GMP_HAVE_AVX2_DISPATCH
// 8 fp32 lanes per mask byte in one 256-bit operation; chosen at run time on CPUs with AVX2.
__attribute__((target("avx2"))) void apply_word_avx2(uint32_t *data, uint64_t word) {
    if (word == ~uint64_t(0))
        return;
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int byte = 0; byte < 8; ++byte) {
        const __m256i b = _mm256_set1_epi32(static_cast<int>((word >> (8 * byte)) & 0xffu));
        auto *p = reinterpret_cast<__m256i *>(data + 8 * byte);
        const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(b, bits), bits);
        const __m256i old = _mm256_loadu_si256(p);
        if (!_mm256_testc_si256(keep, old)) // a pruned lane is not +0.0 yet
            _mm256_storeu_si256(p, _mm256_and_si256(old, keep));
    }
}

__attribute__((target("avx2"))) void apply_tile_avx2(uint32_t *data, const uint8_t *mask, int64_t begin, int64_t end) {
    int64_t first = begin;
    for (; first + 64 <= end; first += 64) {
        uint64_t word;
        std::memcpy(&word, mask + first / 8, 8);
        apply_word_avx2(data + first, word);
    }
    if (first < end)
        apply_tile(data, mask, first, end);
}
#endif

} // namespace

void apply_mask_range(const TensorEntry &entry, int64_t begin, int64_t end) {
    const auto *mask = reinterpret_cast<const uint8_t *>(entry.mask);
    if (entry.dtype == kFloat32)
#ifdef GMP_HAVE_AVX2_DISPATCH
        if (have_avx2())
            apply_tile_avx2(reinterpret_cast<uint32_t *>(entry.data), mask, begin, end);
        else
#endif
            apply_tile(reinterpret_cast<uint32_t *>(entry.data), mask, begin, end);
    else
        apply_tile(reinterpret_cast<uint16_t *>(entry.data), mask, begin, end);
}

void apply_word(const TensorEntry &entry, int64_t first, uint64_t word, int64_t count) {
    if (entry.dtype == kFloat32) {
        auto *data = reinterpret_cast<uint32_t *>(entry.data) + first;
#ifdef GMP_HAVE_AVX2_DISPATCH
        if (have_avx2() && count == 64 && word != 0) {
            apply_word_avx2(data, word);
            return;
        }
#endif
        apply_word_to(data, word, count);
    } else {
        apply_word_to(reinterpret_cast<uint16_t *>(entry.data) + first, word, count);
    }
}

void apply_masks(const TensorEntry *table, int64_t n, int num_threads) {
    check_table(table, n, true);
    const std::vector<Tile> tiles = make_tiles(table, n);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    parallel_for(threads_for(num_threads, num_tiles * kTileElems), num_tiles, [&](int64_t t, int) {
        const Tile &tile = tiles[t];
        apply_mask_range(table[tile.entry], tile.begin, tile.end);
    });
}

} // namespace gmp::cpu
