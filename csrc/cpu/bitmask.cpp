// Packed keep-mask build from a selection row, and bool <-> bit packing (layout: bitpack.h).
#include "../common/bitpack.h"
#include "../ops.h"
#include "cpu_common.h"
#include "keep_word.h"
#include "row_scaled_keys.h"

#include <algorithm>
#include <cstring>

namespace gmp::cpu {
namespace {

inline uint64_t load_word(const uint8_t *mask, int64_t first, int64_t count) {
    uint64_t word = 0;
    std::memcpy(&word, mask + first / 8, static_cast<size_t>(ceil_div<int64_t>(count, 8)));
    return word;
}

// Keep-bits of the `count` elements from `first` (a multiple of 64) by the selection row.
template <typename Reader> uint64_t keep_bits(const Reader &key_of, int64_t first, int64_t count, const Selection &s) {
    const uint64_t key = static_cast<uint64_t>(s.key);
    uint64_t word = 0;
    if (first > s.index || first + count - 1 <= s.index) {
        // The index test is the same for the whole word: ties are all kept (first > index) or all
        // pruned, so keep = key >= limit.
        const uint64_t limit = first > s.index ? key : key + 1;
        if (count == 64)
            return keep_word(key_of, first, limit);
        for (int64_t j = 0; j < count; ++j)
            word |= uint64_t(key_of(first + j) >= limit) << j;
        return word;
    }
    for (int64_t j = 0; j < count; ++j)
        word |= uint64_t(is_kept(key_of(first + j), first + j, static_cast<uint32_t>(key), s.index)) << j;
    return word;
}

#ifdef GMP_HAVE_AVX2_DISPATCH
// build_tile's words for an entry scaled along its rows, from keys made in registers: a word
// whose elements all fall on one side of the row's index (all but at most one) is compared there,
// the other and a partial one from the keys stored to L1.
template <int32_t D> void build_row_scaled(const TensorEntry &entry, const Selection &s, int64_t begin, int64_t end) {
    auto *mask = reinterpret_cast<uint8_t *>(entry.mask);
    const uint64_t key = static_cast<uint64_t>(s.key);
    RowScaledKeys<D> keys(entry, begin);
    alignas(32) uint32_t block[64];
    for (int64_t first = begin; first < end; first += 64) {
        const int64_t count = std::min<int64_t>(64, end - first);
        keys.start_block(first);
        if (count == 64 && (first > s.index || first + 63 <= s.index)) {
            store_word(mask, first, keys.keep_word(first > s.index ? key : key + 1), count);
            continue;
        }
        keys.store_block(count, block);
        // Offset so that key_of(i) reads block[i - first], as keep_bits indexes.
        store_word(mask, first, keep_bits(KeyReader<kFloat32, kNative>{block - first}, first, count, s), count);
    }
}
#endif

#ifdef GMP_HAVE_AVX2_DISPATCH
// build_tile of an unscaled entry with native keys, the weights' bits less the sign: 8 fp32 or
// 16 16-bit lanes a compare, and with zero_pruned each word's vectors cleared where pruned right
// after, from L1 (stored only where a pruned lane is not +0.0 yet, as apply_masks does). The
// SSE2 keep_word compares half as many lanes, and the apply of the whole tile after it read the
// tile again (from L2): 1.25-1.4x (fp32) and 2.2x (bf16) the time on the ResNet-50 set. Words
// that straddle the row's index and a partial last word take keep_bits.
template <int32_t D>
__attribute__((target("avx2"))) void build_native_avx2(const TensorEntry &entry, const Selection &s, int64_t begin,
                                                       int64_t end, bool zero_pruned) {
    using Bits = typename DTypeTraits<D>::bits_t;
    constexpr int kLanes = 32 / int(sizeof(Bits));
    constexpr uint64_t kMaxLimit = uint64_t(1) << (8 * sizeof(Bits) - 1);
    auto *mask = reinterpret_cast<uint8_t *>(entry.mask);
    auto *data = reinterpret_cast<Bits *>(entry.data);
    const uint64_t key = static_cast<uint64_t>(s.key);
    for (int64_t first = begin; first < end; first += 64) {
        const int64_t count = std::min<int64_t>(64, end - first);
        // Ties are all kept (first > index) or all pruned when the index test is the same for the
        // whole word: keep = key >= limit.
        const uint64_t limit = first > s.index ? key : key + 1;
        if (count < 64 || (first <= s.index && first + 63 > s.index) || limit > kMaxLimit) {
            const uint64_t word = keep_bits(KeyReader<D, kNative>{data}, first, count, s);
            store_word(mask, first, word, count);
            if (zero_pruned)
                apply_word(entry, first, word, count);
            continue;
        }
        auto *p = reinterpret_cast<__m256i *>(data + first);
        __m256i keep[8]; // lane masks of the word's vectors: all ones where kept
        uint64_t word = 0;
        if constexpr (kLanes == 8) {
            const __m256i below = _mm256_set1_epi32(static_cast<int32_t>(limit - 1));
            for (int v = 0; v < 8; ++v) {
                const __m256i keys = _mm256_and_si256(_mm256_loadu_si256(p + v), _mm256_set1_epi32(0x7fffffff));
                keep[v] = _mm256_cmpgt_epi32(keys, below);
                word |= uint64_t(static_cast<uint32_t>(_mm256_movemask_ps(_mm256_castsi256_ps(keep[v])))) << (8 * v);
            }
        } else {
            const __m256i below = _mm256_set1_epi16(static_cast<int16_t>(limit - 1));
            for (int v = 0; v < 4; ++v)
                keep[v] =
                    _mm256_cmpgt_epi16(_mm256_and_si256(_mm256_loadu_si256(p + v), _mm256_set1_epi16(0x7fff)), below);
            for (int v = 0; v < 4; v += 2) {
                // Saturating packs give a byte a lane, in 64-bit groups v0-7 w0-7 v8-15 w8-15 (w =
                // v + 1); the permute puts them in element order for one movemask.
                const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(keep[v], keep[v + 1]), 0xd8);
                word |= uint64_t(static_cast<uint32_t>(_mm256_movemask_epi8(bytes))) << (16 * v);
            }
        }
        store_word(mask, first, word, count);
        if (!zero_pruned)
            continue;
        for (int v = 0; v < 64 / kLanes; ++v) { // the vectors were just read: L1
            const __m256i old = _mm256_loadu_si256(p + v);
            if (!_mm256_testc_si256(keep[v], old))
                _mm256_storeu_si256(p + v, _mm256_and_si256(old, keep[v]));
        }
    }
}
#endif

// Set bits of `words` whole 64-bit words from `bytes`. Inlined into count_words_popcnt, the
// builtin is one popcnt a word; the baseline x86-64 build would call libgcc's bit-trick routine.
__attribute__((always_inline)) inline int64_t count_words_inline(const uint8_t *bytes, int64_t words) {
    int64_t count = 0;
    for (int64_t w = 0; w < words; ++w) {
        uint64_t word;
        std::memcpy(&word, bytes + w * 8, sizeof(word));
        count += __builtin_popcountll(word);
    }
    return count;
}

#ifdef GMP_HAVE_AVX2_DISPATCH
__attribute__((target("popcnt"))) int64_t count_words_popcnt(const uint8_t *bytes, int64_t words) {
    return count_words_inline(bytes, words);
}
#endif

int64_t count_words(const uint8_t *bytes, int64_t words) {
#ifdef GMP_HAVE_AVX2_DISPATCH
    if (have_avx2()) // every AVX2 CPU has popcnt
        return count_words_popcnt(bytes, words);
#endif
    return count_words_inline(bytes, words);
}

// Set bits of the entry's mask for elements [begin, end) (begin a multiple of 64).
int64_t count_tile(const TensorEntry &entry, int64_t begin, int64_t end) {
    const auto *mask = reinterpret_cast<const uint8_t *>(entry.mask);
    const int64_t words = (end - begin) / 64;
    int64_t kept = count_words(mask + begin / 8, words);
    const int64_t rest = end - begin - words * 64; // the entry's last, partial word
    if (rest > 0) {
        const uint64_t word = load_word(mask, begin + words * 64, rest);
        kept += __builtin_popcountll(word & ((uint64_t(1) << rest) - 1)); // not the bits past numel
    }
    return kept;
}

} // namespace

void build_tile(const TensorEntry &entry, const Selection &s, int64_t begin, int64_t end, bool zero_pruned) {
    // The apply runs on the tile right after its build, while the tile is still in cache.
    if (s.nan_count > 0) {
        if (zero_pruned)
            apply_mask_range(entry, begin, end); // by the mask the row left as it was
        return;
    }
#ifdef GMP_HAVE_AVX2_DISPATCH
    if (has_row_scaled_keys(entry)) {
        if (entry.dtype == kFloat32)
            build_row_scaled<kFloat32>(entry, s, begin, end);
        else
            build_row_scaled<kBFloat16>(entry, s, begin, end);
        if (zero_pruned)
            apply_mask_range(entry, begin, end);
        return;
    }
#endif
#ifdef GMP_HAVE_AVX2_DISPATCH
    // fp32 keys are native in either space (visit_keys); 16-bit ones only in the native space.
    if (entry.scale == 0 && have_avx2()) {
        if (entry.dtype == kFloat32)
            return build_native_avx2<kFloat32>(entry, s, begin, end, zero_pruned);
        if (s.key_space == kNative && entry.dtype == kBFloat16)
            return build_native_avx2<kBFloat16>(entry, s, begin, end, zero_pruned);
        if (s.key_space == kNative && entry.dtype == kFloat16)
            return build_native_avx2<kFloat16>(entry, s, begin, end, zero_pruned);
    }
#endif
    auto *mask = reinterpret_cast<uint8_t *>(entry.mask);
    visit_keys(entry, static_cast<int32_t>(s.key_space), begin, end, [&](auto key_of) {
        for (int64_t first = begin; first < end; first += 64) {
            const int64_t count = std::min<int64_t>(64, end - first);
            store_word(mask, first, keep_bits(key_of, first, count, s), count);
        }
    });
    if (zero_pruned)
        apply_mask_range(entry, begin, end);
}

void build_tile_around_bucket(const TensorEntry &entry, int32_t key_space, const Bucket &bucket, int64_t begin,
                              int64_t end, int64_t base, std::vector<uint64_t> &composites) {
    auto *mask = reinterpret_cast<uint8_t *>(entry.mask);
    const uint32_t low_mask = (uint32_t(1) << bucket.low_bits) - 1;
    const uint64_t low = uint64_t(bucket.prefix) << bucket.low_bits; // the bucket's first key
    const uint64_t high = uint64_t(bucket.prefix + 1) << bucket.low_bits;
    visit_keys(entry, key_space, begin, end, [&](auto key_of) {
        for (int64_t first = begin; first < end; first += 64) {
            const int64_t count = std::min<int64_t>(64, end - first);
            uint64_t at_least_low = 0;
            uint64_t at_least_high = 0;
            if (count == 64) {
                at_least_low = keep_word(key_of, first, low);
                at_least_high = keep_word(key_of, first, high);
            } else {
                for (int64_t j = 0; j < count; ++j) {
                    at_least_low |= uint64_t(key_of(first + j) >= low) << j;
                    at_least_high |= uint64_t(key_of(first + j) >= high) << j;
                }
            }
            for (uint64_t in_bucket = at_least_low & ~at_least_high; in_bucket != 0; in_bucket &= in_bucket - 1) {
                const int64_t i = first + __builtin_ctzll(in_bucket);
                composites.push_back((uint64_t(key_of(i) & low_mask) << kCompositeIndexBits) | uint64_t(base + i));
            }
            store_word(mask, first, at_least_low, count);
            apply_word(entry, first, at_least_low, count); // while the word's elements are in L1
        }
    });
}

void prune_composites(const TensorEntry *table, const int64_t *bases, int64_t n, const uint64_t *composites,
                      int64_t count, int num_threads) {
    constexpr int64_t kChunk = int64_t(1) << 14;
    parallel_for(threads_for(num_threads, count), ceil_div<int64_t>(count, kChunk), [&](int64_t chunk, int) {
        const int64_t stop = std::min(count, (chunk + 1) * kChunk);
        for (int64_t c = chunk * kChunk; c < stop; ++c) {
            const auto index = static_cast<int64_t>(composites[c] & kCompositeIndexMask);
            const int64_t e = std::upper_bound(bases, bases + n, index) - bases - 1;
            const int64_t i = index - bases[e];
            // Another thread may clear another bit of the same byte.
            __atomic_fetch_and(reinterpret_cast<uint8_t *>(table[e].mask) + i / 8, uint8_t(~(1u << (i % 8))),
                               __ATOMIC_RELAXED);
            const int64_t size = dtype_size(static_cast<int32_t>(table[e].dtype));
            std::memset(reinterpret_cast<uint8_t *>(table[e].data) + i * size, 0, static_cast<size_t>(size));
        }
    });
}

void build_masks(const TensorEntry *table, int64_t n, const Selection *selection, int num_threads, bool zero_pruned,
                 int64_t *kept) {
    check_table(table, n, true);
    GMP_CHECK(n == 0 || selection != nullptr, "selection pointer must not be null");
    for (int64_t e = 0; e < n; ++e)
        check_selection_row(selection[e], e, table[e].numel);
    if (kept != nullptr)
        std::fill(kept, kept + n, int64_t(0));
    const std::vector<Tile> tiles = make_tiles(table, n);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    parallel_for(threads_for(num_threads, num_tiles * kTileElems), num_tiles, [&](int64_t t, int) {
        const Tile &tile = tiles[t];
        build_tile(table[tile.entry], selection[tile.entry], tile.begin, tile.end, zero_pruned);
        if (kept != nullptr) // the tile's mask bytes were just written: the count reads L1
            __atomic_fetch_add(kept + tile.entry, count_tile(table[tile.entry], tile.begin, tile.end),
                               __ATOMIC_RELAXED);
    });
}

void count_kept(const TensorEntry *table, int64_t n, int64_t *out, int num_threads) {
    check_table(table, n, true);
    GMP_CHECK(n == 0 || out != nullptr, "out pointer must not be null");
    std::fill(out, out + n, int64_t(0));
    const std::vector<Tile> tiles = make_tiles(table, n);
    const int64_t num_tiles = static_cast<int64_t>(tiles.size());
    parallel_for(threads_for(num_threads, total_numel(table, n)), num_tiles, [&](int64_t t, int) {
        const Tile &tile = tiles[t];
        __atomic_fetch_add(out + tile.entry, count_tile(table[tile.entry], tile.begin, tile.end), __ATOMIC_RELAXED);
    });
}

void pack_bits(const uint8_t *bools, int64_t numel, uint8_t *packed, int num_threads) {
    GMP_CHECK(numel >= 0, "numel must be >= 0, got ", numel);
    GMP_CHECK(numel == 0 || (bools != nullptr && packed != nullptr), "null pointer");
    const int64_t words = ceil_div<int64_t>(numel, 64);
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads, numel))
    for (int64_t w = 0; w < words; ++w) {
        const int64_t first = w * 64;
        const int64_t count = std::min<int64_t>(64, numel - first);
        uint64_t word = 0;
        for (int64_t j = 0; j < count; ++j)
            word |= uint64_t(bools[first + j] != 0) << j;
        store_word(packed, first, word, count);
    }
}

void unpack_bits(const uint8_t *packed, int64_t numel, uint8_t *bools, int num_threads) {
    GMP_CHECK(numel >= 0, "numel must be >= 0, got ", numel);
    GMP_CHECK(numel == 0 || (bools != nullptr && packed != nullptr), "null pointer");
    const int64_t words = ceil_div<int64_t>(numel, 64);
#pragma omp parallel for schedule(static) num_threads(threads_for(num_threads, numel))
    for (int64_t w = 0; w < words; ++w) {
        const int64_t first = w * 64;
        const int64_t count = std::min<int64_t>(64, numel - first);
        const uint64_t word = load_word(packed, first, count);
        for (int64_t j = 0; j < count; ++j)
            bools[first + j] = static_cast<uint8_t>((word >> j) & 1u);
    }
}

} // namespace gmp::cpu
