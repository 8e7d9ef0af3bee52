// Scaled keys computed in registers, 8 at a time (AVX2), for the loops that read a tile once:
// the sample select's bracket read and the mask build. Other scaled entries take visit_keys'
// buffer (cpu_common.h).
#pragma once

#include "cpu_common.h"

#ifdef GMP_HAVE_AVX2_DISPATCH
namespace gmp::cpu {

constexpr uint32_t kMagnitude = 0x7fffffffu; // a key: the bits less the sign

// The keys of a scaled entry computed in the read's registers. The factors repeat along the
// weight's rows (inner * count elements: a Linear's input features, a conv's channels x taps):
// |w| times the 64 factors of the block, taken from the row's factors (the factors themselves
// when inner == 1, else spelled out once per tile) or, where a row ends inside the block, copied
// around its end.
template <int32_t D> struct RowScaledKeys {
    const typename DTypeTraits<D>::bits_t *bits;
    const float *factors; // of one row, element by element
    int64_t count;        // elements in a row
    int64_t feature;      // position in the row of the next block's first element
    int64_t first = 0;
    const float *window = nullptr; // factors of elements [first, first + 64)
    float wrapped[64];

    RowScaledKeys(const TensorEntry &entry, int64_t begin)
        : bits(reinterpret_cast<const typename DTypeTraits<D>::bits_t *>(entry.data)), factors(row_factors(entry)),
          count(entry.scale_count * entry.scale_inner), feature(begin % count) {}

    void start_block(int64_t block) {
        first = block;
        window = factors + feature;
        if (feature + 64 > count) {
            for (int64_t t = 0, f = feature; t < 64; ++t, f = f + 1 == count ? 0 : f + 1)
                wrapped[t] = factors[f];
            window = wrapped;
        }
        for (feature += 64; feature >= count;) // no division per block
            feature -= count;
    }
    __attribute__((target("avx2"))) __m256i load8(int64_t i) const {
        __m256i magnitude;
        if constexpr (D == kFloat32) {
            magnitude = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(bits + i));
        } else { // bf16: the high half of an fp32
            const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i *>(bits + i));
            magnitude = _mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16);
        }
        const __m256i sign_off = _mm256_set1_epi32(static_cast<int32_t>(kMagnitude));
        const __m256 w = _mm256_castsi256_ps(_mm256_and_si256(magnitude, sign_off));
        const __m256 product = _mm256_mul_ps(w, _mm256_loadu_ps(window + (i - first)));
        return _mm256_and_si256(_mm256_castps_si256(product), sign_off);
    }
    uint32_t at(int64_t i) const { return scaled_key(magnitude_key<D, kWide>(bits[i]), window[i - first]); }
    // Bit j: key of element first + j >= limit, for a whole block (limit <= 2^31: the compares are
    // signed, exact for keys < 2^31).
    __attribute__((target("avx2"))) uint64_t keep_word(uint64_t limit) const {
        const __m256i below = _mm256_set1_epi32(static_cast<int32_t>(limit - 1));
        uint64_t word = 0;
        for (int q = 0; q < 8; ++q) {
            const __m256i kept = _mm256_cmpgt_epi32(load8(first + 8 * q), below);
            word |= uint64_t(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(kept)))) << (8 * q);
        }
        return word;
    }
    // Keys of the block's `count` elements into out[0, count).
    __attribute__((target("avx2"))) void store_block(int64_t count, uint32_t *out) const {
        if (count < 64) {
            for (int64_t j = 0; j < count; ++j)
                out[j] = at(first + j);
            return;
        }
        for (int q = 0; q < 8; ++q)
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(out + 8 * q), load8(first + 8 * q));
    }
};

} // namespace gmp::cpu
#endif
