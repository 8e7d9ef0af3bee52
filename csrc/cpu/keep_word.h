// keep_word: the 64 keep-bits of a mask word from the weights (SSE2 where the key is the raw bits
// less the sign bit), shared by mask build and the selection's first pass.
#pragma once

#include "cpu_common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace gmp::cpu {

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

} // namespace gmp::cpu
