// Shared pieces of the CPU kernels: work tiles over a tensor table, the dtype dispatch that
// turns a table entry into a key reader, and thread-count policy.
#pragma once

#include "../common/checks.h"
#include "../common/keys.h"
#include "../common/tensor_table.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define GMP_HAVE_AVX2_DISPATCH 1
#endif

namespace gmp::cpu {

// Work unit of every parallel loop: tiles never cross tensors and start at multiples of 64
// elements, so a tile owns whole 64-bit mask words and can be processed without sharing.
constexpr int64_t kTileElems = int64_t(1) << 16;

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kMinParallelElems = int64_t(1) << 15;

struct Tile {
    int64_t entry; // row of the table
    int64_t begin; // first flat index in the entry
    int64_t end;   // one past the last
    int64_t base;  // index of the entry's element 0 in the selection's order
};

#ifdef GMP_HAVE_AVX2_DISPATCH
// Whether this CPU runs the kernels' target("avx2") variants (the build targets baseline x86-64).
// __builtin_cpu_init first: the first call may come before libgcc's own constructor has run.
inline bool have_avx2() {
    static const bool have = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
    return have;
}
#endif

// The factors of one row of a scaled entry (scale_inner * scale_count elements), element by
// element: its factors themselves when scale_inner == 1, else spelled out into a buffer of this
// thread's (valid until its next call).
inline const float *row_factors(const TensorEntry &entry) {
    const auto *factors = reinterpret_cast<const float *>(entry.scale);
    if (entry.scale_inner == 1)
        return factors;
    thread_local std::vector<float> spelled;
    spelled.resize(static_cast<size_t>(entry.scale_inner * entry.scale_count));
    for (int64_t f = 0; f < entry.scale_count; ++f)
        std::fill_n(spelled.begin() + f * entry.scale_inner, entry.scale_inner, factors[f]);
    return spelled.data();
}

// Longest row of factors (scale_inner * scale_count elements) that RowScaledKeys spells out.
constexpr int64_t kMaxSpelledRow = kTileElems / 2;

// Whether the tile-reading loops (bracket read, mask build) compute an entry's scaled keys in
// registers (row_scaled_keys.h): fp32 or bf16, rows of factors short enough, AVX2.
inline bool has_row_scaled_keys(const TensorEntry &entry) {
#ifdef GMP_HAVE_AVX2_DISPATCH
    return entry.scale != 0 && (entry.dtype == kFloat32 || entry.dtype == kBFloat16) &&
           (entry.scale_inner == 1 || entry.scale_inner * entry.scale_count <= kMaxSpelledRow) && have_avx2();
#else
    return false;
#endif
}

// Tiles of the other scaled entries, whose keys a visit computes into a buffer first: one that
// stays in L1.
constexpr int64_t kScaledTileElems = int64_t(1) << 13;

// Tiles of entries [0, n) in table order; `base` is the running element count.
inline std::vector<Tile> make_tiles(const TensorEntry *table, int64_t n) {
    std::vector<Tile> tiles;
    int64_t base = 0;
    for (int64_t e = 0; e < n; ++e) {
        const bool buffered = table[e].scale != 0 && !has_row_scaled_keys(table[e]);
        const int64_t size = buffered ? kScaledTileElems : kTileElems;
        for (int64_t b = 0; b < table[e].numel; b += size)
            tiles.push_back({e, b, std::min(b + size, table[e].numel), base});
        base += table[e].numel;
    }
    return tiles;
}

inline int64_t total_numel(const TensorEntry *table, int64_t n) {
    int64_t total = 0;
    for (int64_t e = 0; e < n; ++e)
        total += table[e].numel;
    return total;
}

inline int threads_for(int requested, int64_t elems) { return elems < kMinParallelElems ? 1 : std::max(1, requested); }

// Runs body(t, thread) for t in [0, count). With threads > 1: one parallel region whose threads
// take one index at a time, so a thread the OS deschedules (another process busy on the cores)
// holds back one tile, not a fixed share of the loop, while the others take the rest; otherwise a
// plain loop on the calling thread, which may be a thread of an enclosing region.
template <typename F> void parallel_for(int threads, int64_t count, F &&body) {
#ifdef _OPENMP
    if (threads > 1 && count > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t t = 0; t < count; ++t)
            body(t, omp_get_thread_num());
        return;
    }
#endif
    for (int64_t t = 0; t < count; ++t)
        body(t, 0);
}

inline void check_table(const TensorEntry *table, int64_t n, bool needs_mask) {
    GMP_CHECK(n >= 0, "table size must be >= 0, got ", n);
    GMP_CHECK(n == 0 || table != nullptr, "table pointer is null");
    for (int64_t e = 0; e < n; ++e) {
        const TensorEntry &t = table[e];
        GMP_CHECK(is_valid_dtype(static_cast<int32_t>(t.dtype)), "entry ", e, ": unknown dtype code ", t.dtype);
        GMP_CHECK(t.numel >= 0, "entry ", e, ": numel must be >= 0, got ", t.numel);
        GMP_CHECK(t.numel == 0 || t.data != 0, "entry ", e, ": data pointer is null");
        GMP_CHECK(t.data % dtype_size(static_cast<int32_t>(t.dtype)) == 0, "entry ", e, ": data pointer is misaligned");
        GMP_CHECK(!needs_mask || t.numel == 0 || t.mask != 0, "entry ", e, ": mask pointer is null");
        GMP_CHECK(t.scale == 0 || (t.scale_inner >= 1 && t.scale_count >= 1 && t.scale % alignof(float) == 0), "entry ",
                  e, ": a scale needs scale_inner >= 1, scale_count >= 1 and an aligned address, got ", t.scale_inner,
                  ", ", t.scale_count);
    }
}

// A selection over all entries compares their keys in one space: scaled keys are wide, so with
// 16-bit weights the native space (their own 15-bit keys) cannot hold them.
inline void check_scaled_space(const TensorEntry *table, int64_t n, int32_t key_space) {
    for (int64_t e = 0; e < n; ++e)
        GMP_CHECK(key_space == kWide || table[e].scale == 0 || table[e].dtype == kFloat32, "entry ", e,
                  " is scaled: its keys are wide, so a selection over 16-bit weights needs the wide key space");
}

// Stores the low `count` bits of `word` at bit `first` (a multiple of 64) of `mask`, touching
// only the mask_bytes(first + count) bytes that belong to the tensor.
inline void store_word(uint8_t *mask, int64_t first, uint64_t word, int64_t count) {
    std::memcpy(mask + first / 8, &word, static_cast<size_t>(ceil_div<int64_t>(count, 8)));
}

// Zeroes the elements [begin, end) of the entry whose mask bit is 0 (begin a multiple of 64):
// apply_masks' tile loop (cpu/apply_masks.cpp), also run by a build that zeroes what it prunes.
void apply_mask_range(const TensorEntry &entry, int64_t begin, int64_t end);

// Zeroes the elements [first, first + count) of the entry (first a multiple of 64, count <= 64)
// whose bit in `word` is 0: the same apply for a word a kernel holds in a register.
void apply_word(const TensorEntry &entry, int64_t first, uint64_t word, int64_t count);

// Mask build from a selection row over elements [begin, end) of the entry (begin a multiple of
// 64): build_masks' tile loop (cpu/bitmask.cpp), also run by the fused prune step.
void build_tile(const TensorEntry &entry, const Selection &s, int64_t begin, int64_t end, bool zero_pruned);

// Composites of a selection's candidates: (low key bits << kCompositeIndexBits) | index in the
// selection's order. Unique, so they sort like (key, index) whatever order they were gathered in.
constexpr int kCompositeIndexBits = 49;
constexpr uint64_t kCompositeIndexMask = (uint64_t(1) << kCompositeIndexBits) - 1;

// The keys whose high bits (key >> low_bits) equal `prefix`: the radix bucket that holds the
// threshold after the first pass.
struct Bucket {
    uint32_t prefix;
    int low_bits;
};

// The prune step's build before its threshold is exact (cpu/bitmask.cpp): over elements
// [begin, end) of the entry, keeps the keys above the bucket, prunes and zeroes those below it,
// keeps the bucket's for now and appends their composites (index: `base` + flat index).
void build_tile_around_bucket(const TensorEntry &entry, int32_t key_space, const Bucket &bucket, int64_t begin,
                              int64_t end, int64_t base, std::vector<uint64_t> &composites);

// The exact k-th smallest (key, index in the selection's order) over entries [0, n) ranked in
// `key_space` by sample select (cpu/sample_select.cpp), read by `num_threads` threads; false when
// it cannot tell in one read (then nothing was decided and the caller runs the histogram select)
// or the entries are neither all fp32 or scaled (whose keys are fp32 bit patterns, the same in
// both key spaces) nor all of one 16-bit dtype ranked in the native space.
bool select_by_sample(const TensorEntry *table, int64_t n, int64_t k, int32_t key_space, int num_threads, uint32_t &key,
                      int64_t &index);

// Clears the mask bit and zeroes the element of each of `count` composites; an index belongs to
// the entry e with bases[e] <= index < bases[e + 1] (bases ascending, n of them).
void prune_composites(const TensorEntry *table, const int64_t *bases, int64_t n, const uint64_t *composites,
                      int64_t count, int num_threads);

// A selection row as mask build reads it: a 32-bit key, an index in [-1, positions) (positions:
// the elements the selection ranked), a known key space.
inline void check_selection_row(const Selection &s, int64_t e, int64_t positions) {
    GMP_CHECK(s.key >= 0 && s.key <= int64_t(UINT32_MAX), "entry ", e, ": threshold key out of range: ", s.key);
    GMP_CHECK(s.index >= -1 && s.index < std::max<int64_t>(positions, 1), "entry ", e,
              ": threshold index out of range: ", s.index);
    GMP_CHECK(s.key_space == kNative || s.key_space == kWide, "entry ", e, ": unknown key space ", s.key_space);
}

template <int32_t D, int32_t S> struct KeyReader {
    const typename DTypeTraits<D>::bits_t *bits;
    uint32_t operator()(int64_t i) const { return magnitude_key<D, S>(bits[i]); }
};

// Keys of elements [begin, end) of a scaled entry, into out[0, end - begin) (cpu/scaled_keys.cpp).
void scaled_keys(const TensorEntry &entry, int64_t begin, int64_t end, uint32_t *out);

// The keys of elements [begin, end) of a scaled entry in a buffer of this thread's (valid until
// its next call), addressed like the weights: element i's key is at [i], for i in [begin, end).
inline const uint32_t *scaled_range_keys(const TensorEntry &entry, int64_t begin, int64_t end) {
    thread_local std::vector<uint32_t> keys;
    if (keys.size() < static_cast<size_t>(end - begin))
        keys.resize(static_cast<size_t>(end - begin));
    scaled_keys(entry, begin, end, keys.data());
    return keys.data() - begin;
}

// Calls f(reader) with a KeyReader for the keys of elements [begin, end) of the entry (f reads no
// others), specialised for the entry's dtype and the key space, so the element loops inside f
// compile once per (dtype, space) with no branch per element. A scaled entry's keys are computed
// into a buffer of this thread's first and read as fp32 keys (wide: `space` does not apply).
template <typename F> void visit_keys(const TensorEntry &entry, int32_t space, int64_t begin, int64_t end, F &&f) {
    if (entry.scale != 0) {
        f(KeyReader<kFloat32, kNative>{scaled_range_keys(entry, begin, end)});
        return;
    }
    const void *data = reinterpret_cast<const void *>(entry.data);
    const auto *bits16 = static_cast<const uint16_t *>(data);
    switch (entry.dtype) {
    case kFloat32:
        f(KeyReader<kFloat32, kNative>{static_cast<const uint32_t *>(data)});
        return;
    case kFloat16:
        if (space == kNative)
            f(KeyReader<kFloat16, kNative>{bits16});
        else
            f(KeyReader<kFloat16, kWide>{bits16});
        return;
    case kBFloat16:
        if (space == kNative)
            f(KeyReader<kBFloat16, kNative>{bits16});
        else
            f(KeyReader<kBFloat16, kWide>{bits16});
        return;
    default:
        throw std::invalid_argument(detail::concat("gmp_ext._C: unknown dtype code ", entry.dtype));
    }
}

} // namespace gmp::cpu
