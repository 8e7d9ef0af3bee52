// Exact k-th smallest (|w|, index) selection on the GPU: a multi-block, multi-pass
// histogram radix select over the device-resident table, with the same rows as cpu/select.cpp.
// A scaled entry ranks its scaled keys instead (keys.h: scaled_key, wide space), read per tile
// through its key reader (cuda_common.cuh: ScaledKeyType); its per-layer rows say kWide.
//
// A call is one fixed launch sequence with no host synchronisation, so it can be captured in a
// CUDA graph; all per-pass state lives in the caller's scratch buffer:
//   memset(state) -> init -> small entries -> [sample bracket: sample, bracket read, resolve]
//   -> kMaxPasses x (pass, resolve) -> tie scan -> finish.
// The sample bracket (a selection, not a prune step; "Sample bracket" below) settles most large
// segments with one read of the weights; the passes then only rank what that read gathered.
// A segment (an entry in layerwise mode, the whole table in global mode) is a small state machine.
// A pass does what each segment's stage asks and skips the others; a resolve (one block per
// segment) finds the bucket holding the target, updates its rank and sets the next stage:
//   kKey:  read all elements and histogram the next key digit of those whose known high key bits
//          match. When they fit the segment's candidate slots, the same read also stores them as
//          composites (unknown low key bits << idx_bits | position): unique, so ties need no
//          further care and the slot order that atomics give does not matter.
//   kBuf:  histogram the next digit of the stored composites that match the known prefix.
//   kTile: key T known, its ties too many to store: histogram the ties per group of tiles, narrowing
//          the tiles that hold the target up to 8192-fold per pass (only the first reads them all).
//          Zero fast path: when the first pass finds at least `rank` exact zeros (the weights hold
//          the pruned zeros of an earlier step), T = 0 and the ties per tile are the zeros that
//          pass stored in the segment's candidate slots, so no tile pass reads the weights again.
//   kScan: one warp walks the target tile in index order to the rank-th tie.
//   kBracket: the sample's bracket read (kBracketPass), resolved by kResolveBracket into kBuf,
//          kTile over stored tie counts, kDone (NaN read), or, when it missed, kKey's first pass.
// A position is (tile - the segment's first tile) * kTileElems + offset: the flat index in
// layerwise mode and, in global mode, a stand-in for the global index with the same order.
//
// A prune step (prune_layerwise / prune_global: the selection, then build_masks with zero_pruned)
// runs the same sequence with one change: a segment's compacting pass also builds its masks and
// zeroes its pruned elements (SegState::fused), from the registers it read the tile into. Keys
// above the bucket are kept, keys below it pruned and zeroed; the bucket's elements are left
// pruned in the mask and unzeroed until kFixup, after the finish, sets the bits of those above
// the threshold and zeroes the others. A step whose bucket fits the slots after the first pass
// thus reads the weights twice; other segments (small entries, heavy ties, the zero fast path,
// NaN weights, k == 0, mixed dtypes in the wide key space, scaled and unscaled entries in one
// global segment) are built by build_masks afterwards.
#include "cuda_common.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace gmp::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 13-bit digits: for fp32 and bf16 the first spans the exponent and 5 mantissa bits, so the bucket
// holding the median of normally distributed weights is ~1% of them and fits the candidate slots.
// 2^13 uint32 bins are 32 KB of shared memory, within the static limit of every target.
constexpr int kDigitBits = 13;
constexpr int kBins = 1 << kDigitBits;
// Candidate slots per tile: 1/64 of the elements, 8 bytes each (6.25% of bf16, 3.1% of fp32 bytes).
constexpr int64_t kSlotsPerTile = kTileElems / 64;
// Entries up to this size are selected by one block each, on chip.
constexpr int64_t kSmallEntry = int64_t(1) << 14;
constexpr int kSmallDigitBits = 11;
// Every larger entry has at least this many tiles: bounds the number of histogram rows.
constexpr int64_t kMinLargeTiles = ceil_div<int64_t>(kSmallEntry + 1, kTileElems);
// Shared histograms are flushed at least every 2^31 elements so their uint32 bins cannot overflow.
constexpr int64_t kFlushTiles = int64_t(1) << 20;
// With at most 2^41 tiles, positions have at most 52 bits. Passes on the longest path (31-bit keys,
// a bucket too big for the candidate slots at every step): 3 key digits (13 + 13 + 5 bits), then
// 4 composite digits (ceil(52 / 13)) or 4 tile digits (ceil(41 / 13)) before the scan.
constexpr int64_t kMaxTiles = int64_t(1) << 41;
constexpr int kMaxPasses = 7;

enum Stage : int32_t { kDone, kSmall, kKey, kBuf, kTile, kScan, kBracket };

// Per-segment plan: written by init, the small-entry kernel, the sample bracket, the resolves and scan;
// read-only in passes.
struct SegState {
    int64_t rank;       // 1-based rank of the target among the elements passing the current filter
    int64_t tile0;      // first tile of the segment
    int64_t tile_begin; // kTile/kScan: tiles [tile_begin, tile_end) hold the target
    int64_t tile_end;
    int64_t cand_begin; // the segment's candidate slots
    int64_t cand_cap;
    int64_t count_begin;  // slots of the per-tile tie counts that kTile reads (SegState::zero_tiles)
    int64_t hist_row;     // its row of the global histograms
    int64_t result_pos;   // kDone: position of the threshold element, -1 when nothing is pruned
    int64_t elems;        // elements of the segment
    uint64_t comp_prefix; // kBuf: known high bits of the target's composite
    uint32_t key_prefix;  // known high key bits (key >> key_shift); kDone: the threshold key
    uint32_t key_base;    // kBuf after a bracket: what a composite's key bits are counted from
    uint32_t bracket_lo;  // kBracket: the read counts keys < lo, the ties of lo and of hi per tile,
    uint32_t bracket_hi;  // and stores the keys strictly between them as composites
    uint32_t inf;         // infinity key: larger keys are NaN
    int32_t stage;
    int32_t key_bits;    // 31 or 15
    int32_t key_shift;   // key bits below key_prefix; frozen once composites hold them
    int32_t idx_bits;    // position bits of a composite
    int32_t digit_shift; // kKey/kBuf: the digit the next pass histograms
    int32_t digit_bits;
    int32_t compact;     // kKey: the next pass also stores composites
    int32_t comp_shift;  // kBuf: composite bits below comp_prefix
    int32_t tile_shift;  // kTile: log2 of the tiles per bin
    int32_t zero_tiles;  // kTile: ties per tile are counts a read stored (first pass: zeros; bracket)
    int32_t count_shift; // of a tile's count in its slot (a bracket read stores lo's and hi's ties)
    int32_t fused;       // prune step: the compacting pass builds the masks, kFixup completes them
    int32_t one_reader;  // all its tiles have one key reader (element type, scaled or not): it may fuse
};

// Updated with atomics during passes, so kept apart from the plan that blocks copy.
struct SegCounters {
    unsigned long long nan_count;
    unsigned long long fill;  // composites stored
    unsigned long long zeros; // exact zero keys (first pass)
    unsigned long long below; // bracket read: keys below lo
    unsigned long long lo_ties;
    unsigned long long hi_ties;
};

struct PassArgs {
    const TensorEntry *table;
    int64_t n;
    SegState *state;
    SegCounters *counters;
    unsigned long long *hist; // rows of kBins
    uint64_t *cand;
    int64_t total_tiles;
    int32_t space;
};

// Block-wide helpers (blockDim.x == Threads: kThreads unless a kernel names another).

template <int Threads = kThreads> __device__ int64_t block_exclusive_sum(int64_t v, int64_t &total) {
    constexpr int kBlockWarps = Threads / 32;
    __shared__ int64_t warp_totals[kBlockWarps];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int64_t inclusive = v;
    for (int d = 1; d < 32; d *= 2) {
        const int64_t other = __shfl_up_sync(kFullWarp, inclusive, d);
        if (lane >= d)
            inclusive += other;
    }
    if (lane == 31)
        warp_totals[warp] = inclusive;
    __syncthreads();
    int64_t before = 0;
    total = 0;
    for (int w = 0; w < kBlockWarps; ++w) {
        before += w < warp ? warp_totals[w] : 0;
        total += warp_totals[w];
    }
    __syncthreads(); // warp_totals is rewritten by the next call
    return before + inclusive - v;
}

struct Bucket {
    int32_t bin; // -1: rank outside [1, total], an inconsistent state that stops the segment
    int64_t below;
    int64_t count;
};

// The bin holding the rank-th (1-based) counted element: below < rank <= below + count.
template <int Threads = kThreads, typename CountT>
__device__ Bucket find_bucket(const CountT *counts, int bins, int64_t rank) {
    __shared__ Bucket found;
    const int per = ceil_div(bins, Threads);
    const int lo = min(bins, int(threadIdx.x) * per), hi = min(bins, lo + per);
    int64_t sum = 0;
    for (int b = lo; b < hi; ++b)
        sum += static_cast<int64_t>(counts[b]);
    int64_t total;
    const int64_t before = block_exclusive_sum<Threads>(sum, total);
    if (threadIdx.x == 0 && (rank < 1 || rank > total))
        found = Bucket{-1, 0, 0};
    if (rank >= 1 && before < rank && rank <= before + sum) { // exactly one thread
        int64_t below = before;
        for (int b = lo; b < hi; ++b) {
            const int64_t c = static_cast<int64_t>(counts[b]);
            if (below + c >= rank) {
                found = Bucket{b, below, c};
                break;
            }
            below += c;
        }
    }
    __syncthreads();
    const Bucket result = found;
    __syncthreads(); // found is rewritten by the next call
    return result;
}

// State transitions (one thread).

__device__ void set_digit(int32_t unknown_bits, int32_t &shift, int32_t &bits) {
    shift = max(0, unknown_bits - kDigitBits);
    bits = unknown_bits - shift;
}

__device__ void start_keys(SegState &s) {
    s.key_prefix = 0;
    s.key_shift = s.key_bits;
    set_digit(s.key_shift, s.digit_shift, s.digit_bits);
    s.compact = 0;
    s.stage = kKey;
}

__device__ void finish(SegState &s, uint32_t key, int64_t pos) {
    s.key_prefix = key;
    s.result_pos = pos;
    s.stage = kDone;
}

// The composite is fully known: split it into key and position.
__device__ void finish_composite(SegState &s) {
    const uint64_t c = s.comp_prefix;
    finish(s, s.key_base + ((s.key_prefix << s.key_shift) | static_cast<uint32_t>(c >> s.idx_bits)),
           static_cast<int64_t>(c & ((uint64_t(1) << s.idx_bits) - 1)));
}

// Tiles [tile_begin, tile_end) hold the target: scan the tile, or histogram them in <= kBins bins.
__device__ void narrow_tiles(SegState &s) {
    const int64_t tiles = s.tile_end - s.tile_begin;
    if (tiles <= 1) {
        s.stage = kScan;
        return;
    }
    s.tile_shift = max(0, bit_length(static_cast<uint64_t>(tiles - 1)) - kDigitBits);
    s.stage = kTile;
}

// The target is the composite whose bits above `shift` are `prefix`: rank the stored ones.
__device__ void rank_composites(SegState &s, uint64_t prefix, int32_t shift) {
    s.comp_prefix = prefix;
    s.comp_shift = shift;
    s.stage = kBuf;
    if (shift == 0)
        finish_composite(s);
    else
        set_digit(shift, s.digit_shift, s.digit_bits);
}

__device__ void after_key_digit(SegState &s, uint32_t bin, int64_t count) {
    if (s.compact) {
        // The pass stored the bucket's composites, whose top bits are this digit: go on with them.
        s.compact = 0;
        rank_composites(s, bin, s.digit_shift + s.idx_bits);
        return;
    }
    s.key_prefix = (s.key_prefix << s.digit_bits) | bin;
    s.key_shift = s.digit_shift;
    if (s.key_shift > 0) {
        set_digit(s.key_shift, s.digit_shift, s.digit_bits);
        s.compact = count <= s.cand_cap && s.key_shift + s.idx_bits <= 64;
        return;
    }
    // Key T known and its ties did not fit the slots: find the target's tile among all of them.
    narrow_tiles(s);
}

__device__ void after_comp_digit(SegState &s, uint32_t bin) {
    rank_composites(s, (s.comp_prefix << s.digit_bits) | bin, s.digit_shift);
}

__device__ void after_tile_digit(SegState &s, uint32_t bin) {
    s.tile_begin += int64_t(bin) << s.tile_shift;
    s.tile_end = min(s.tile_end, s.tile_begin + (int64_t(1) << s.tile_shift));
    narrow_tiles(s);
}

// Init: one block.

__global__ void __launch_bounds__(kThreads) kInitLayerwise(const TensorEntry *table, int64_t n, const int64_t *k,
                                                           SegState *state, int64_t rows, int64_t slots) {
    int64_t rows_before = 0;
    for (int64_t base = 0; base < n; base += kThreads) {
        const int64_t e = base + threadIdx.x;
        const TensorEntry entry = e < n ? table[e] : TensorEntry{};
        const int32_t dtype = static_cast<int32_t>(entry.dtype);
        const bool selectable = e < n && entry.numel > 0 && entry.data != 0 && is_valid_dtype(dtype);
        const bool large = selectable && entry.numel > kSmallEntry;
        // Histogram rows go to the large entries only, in table order.
        int64_t large_here;
        const int64_t row = rows_before + block_exclusive_sum(large, large_here);
        rows_before += large_here;
        if (e >= n)
            continue;
        SegState s{};
        finish(s, 0, -1);
        if (selectable) {
            const int64_t tiles = ceil_div<int64_t>(entry.numel, kTileElems);
            s.rank = min(max(k[e], int64_t(0)), entry.numel);
            s.tile0 = s.tile_begin = entry.tile_base;
            s.tile_end = entry.tile_base + tiles;
            const int32_t space = entry_key_space(entry, kNative);
            s.key_bits = key_bits(dtype, space);
            s.inf = inf_key(dtype, space);
            s.one_reader = 1;
            s.idx_bits = bit_length(static_cast<uint64_t>(entry.numel - 1));
            s.elems = entry.numel;
            if (!large) {
                s.stage = kSmall;
            } else if (row < rows) {
                start_keys(s);
                s.hist_row = row;
                // Slots mirror tiles: the segment owns kSlotsPerTile slots per tile of its own.
                s.cand_begin = entry.tile_base * kSlotsPerTile;
                const bool inside = s.cand_begin >= 0 && s.cand_begin <= slots;
                s.cand_cap = inside ? min(tiles * kSlotsPerTile, slots - s.cand_begin) : 0;
                s.count_begin = s.cand_begin;
            }
        }
        state[e] = s;
    }
}

__global__ void __launch_bounds__(kThreads)
    kInitGlobal(const TensorEntry *table, int64_t n, const int64_t *k, int32_t space, SegState *state,
                int64_t total_tiles, int64_t slots) {
    const TensorEntry entry0 = table[0];
    int64_t partial = 0, other_readers = 0;
    for (int64_t e = threadIdx.x; e < n; e += kThreads) {
        const TensorEntry entry = table[e];
        partial += max(int64_t(0), entry.numel);
        other_readers += entry.dtype != entry0.dtype || (entry.scale != 0) != (entry0.scale != 0);
    }
    int64_t total, other_total;
    block_exclusive_sum(partial, total);
    block_exclusive_sum(other_readers, other_total);
    if (threadIdx.x != 0)
        return;
    const int32_t dtype = static_cast<int32_t>(entry0.dtype);
    SegState s{};
    finish(s, 0, -1);
    if (total > 0 && total_tiles > 0 && is_valid_dtype(dtype)) {
        s.rank = min(max(*k, int64_t(0)), total);
        s.tile_end = total_tiles;
        s.key_bits = key_bits(dtype, space);
        s.inf = inf_key(dtype, space);
        s.idx_bits = bit_length(static_cast<uint64_t>(total_tiles * kTileElems - 1));
        s.cand_cap = min(total_tiles * kSlotsPerTile, slots);
        s.elems = total;
        s.one_reader = other_total == 0;
        start_keys(s);
    }
    state[0] = s;
}

// Entries of at most kSmallEntry elements: one block per entry, radix passes of 11 bits and an
// ordered tie scan, re-reading the entry from L1/L2 instead of copying it to shared memory.

template <typename KT>
__device__ void select_small(const TensorEntry &entry, SegState &state, SegCounters &counters, uint32_t *hist) {
    __shared__ int64_t found_pos;
    const auto *bits = reinterpret_cast<const typename KT::bits_t *>(entry.data);
    const KT keys = KT::at(entry, 0); // numel <= kSmallEntry <= kScaleSpan: one span
    const int numel = static_cast<int>(entry.numel);
    const uint32_t inf = state.inf;
    int64_t rank = state.rank;
    uint32_t prefix = 0;
    int unknown = state.key_bits;
    for (bool first = true; unknown > 0; first = false) {
        const int shift = max(0, unknown - kSmallDigitBits);
        const int bins = 1 << (unknown - shift);
        for (int b = threadIdx.x; b < bins; b += kThreads)
            hist[b] = 0;
        __syncthreads();
        uint32_t nans = 0, zeros = 0;
        for (int i = threadIdx.x; i < numel; i += kThreads) {
            const uint32_t key = keys.key(bits[i], i);
            nans += first && key > inf;
            zeros += first && key == 0;
            if ((key >> unknown) == prefix)
                atomicAdd(&hist[(key >> shift) & (bins - 1)], 1u);
        }
        __syncthreads();
        if (first) {
            int64_t nan_total;
            block_exclusive_sum(nans, nan_total);
            if (nan_total > 0 || rank == 0) {
                if (threadIdx.x == 0) {
                    counters.nan_count = static_cast<unsigned long long>(nan_total);
                    finish(state, 0, -1);
                }
                return;
            }
            int64_t zero_total;
            block_exclusive_sum(zeros, zero_total);
            if (zero_total >= rank)
                break; // zero fast path: T = 0 (prefix), the target is the rank-th zero
        }
        const Bucket b = find_bucket(hist, bins, rank);
        if (b.bin < 0) {
            if (threadIdx.x == 0)
                finish(state, 0, -1);
            return;
        }
        rank -= b.below;
        prefix = (prefix << (unknown - shift)) | static_cast<uint32_t>(b.bin);
        unknown = shift;
    }
    // Key T = prefix; the target is the rank-th element equal to it in index order.
    if (threadIdx.x == 0)
        found_pos = -1;
    int64_t ties_before = 0;
    for (int base = 0; base < numel; base += kThreads) {
        const int i = base + threadIdx.x;
        const bool tie = i < numel && keys.key(bits[i], i) == prefix;
        int64_t chunk_ties;
        const int64_t before = block_exclusive_sum(tie, chunk_ties);
        if (tie && ties_before + before + 1 == rank)
            found_pos = i;
        ties_before += chunk_ties;
        if (ties_before >= rank)
            break;
    }
    __syncthreads();
    if (threadIdx.x == 0)
        finish(state, prefix, found_pos);
}

__global__ void __launch_bounds__(kThreads)
    kSelectSmall(const TensorEntry *table, SegState *state, SegCounters *counters) {
    __shared__ uint32_t hist[1 << kSmallDigitBits];
    const int64_t e = blockIdx.x;
    if (state[e].stage != kSmall)
        return;
    const TensorEntry entry = table[e];
    visit_key_type(entry, kNative, [&](auto kt) { select_small<decltype(kt)>(entry, state[e], counters[e], hist); });
}

// Calls f(seg, a, b) for each segment with tiles [a, b) in the block's contiguous range of the
// persistent grid (all of them in one call of a global selection), in order.
template <bool Global, typename F> __device__ __forceinline__ void for_each_segment_range(const PassArgs &p, F &&f) {
    const int64_t per = ceil_div<int64_t>(p.total_tiles, gridDim.x);
    const int64_t lo = int64_t(blockIdx.x) * per, hi = min(lo + per, p.total_tiles);
    if (lo >= hi)
        return;
    const int64_t segments = Global ? 1 : p.n;
    for (int64_t seg = Global ? 0 : entry_of_tile(p.table, p.n, lo); seg < segments; ++seg) {
        int64_t first = 0, last = p.total_tiles;
        if (!Global) {
            const TensorEntry entry = p.table[seg];
            if (entry.tile_base >= hi)
                break;
            first = entry.tile_base;
            last = entry.tile_base + ceil_div(max(entry.numel, int64_t(0)), kTileElems);
        }
        const int64_t a = max(lo, first), b = min(hi, last);
        if (a < b)
            f(seg, a, b);
    }
}

// Passes: a persistent grid of blocks, each owning a contiguous range of tiles so that it meets
// few segments and flushes few shared histograms; a warp reads one tile at a time.

template <bool Global, typename F>
__device__ __forceinline__ void visit_tile(const PassArgs &p, int64_t seg, int64_t tile, int lane, F &&f) {
    const TensorEntry entry = p.table[Global ? entry_of_tile(p.table, p.n, tile) : seg];
    const int count = tile_count(entry, tile);
    const int64_t first = (tile - entry.tile_base) * kTileElems;
    // Layerwise keys are native (PassArgs::space): the constant keeps the wide readers out.
    visit_key_type(entry, Global ? p.space : int32_t(kNative),
                   [&](auto kt) { for_each_tile_key<decltype(kt)>(entry, first, count, lane, f); });
}

__device__ __forceinline__ void clear_bins(uint32_t *bins, int count) {
    __syncthreads(); // earlier readers of the bins are done
    for (int b = threadIdx.x; b < count; b += kThreads)
        bins[b] = 0;
    __syncthreads();
}

__device__ __forceinline__ void flush_bins(const uint32_t *bins, int count, unsigned long long *row) {
    __syncthreads();
    for (int b = threadIdx.x; b < count; b += kThreads) {
        const uint32_t v = bins[b];
        if (v != 0)
            atomicAdd(row + b, static_cast<unsigned long long>(v));
    }
}

// Slot reservation of the compacting passes: one global atomic per block and round of kWarps
// tiles reserves the slots of all its warps' matches. Every thread of the block calls it (two
// barriers); `r.matches` must be 0 before a block's first call, and is again after every call.
struct Reservation {
    uint32_t matches;
    unsigned long long slot;
};

__device__ int64_t reserve_slots(Reservation &r, uint32_t matches, unsigned long long *fill) {
    const uint32_t offset = matches != 0 ? atomicAdd(&r.matches, matches) : 0;
    __syncthreads();
    if (threadIdx.x == 0) {
        const uint32_t round = r.matches;
        r.slot = round != 0 ? atomicAdd(fill, static_cast<unsigned long long>(round)) : 0;
        r.matches = 0;
    }
    __syncthreads();
    return static_cast<int64_t>(r.slot) + offset;
}

template <bool Global>
__device__ void key_pass(const PassArgs &p, int64_t seg, const SegState &s, int64_t a, int64_t b, uint32_t *bins) {
    __shared__ Reservation reservation;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const uint32_t prefix = s.key_prefix, inf = s.inf, low_mask = (1u << s.key_shift) - 1;
    const int key_shift = s.key_shift, digit_shift = s.digit_shift, idx_bits = s.idx_bits;
    const int nbins = 1 << s.digit_bits;
    const uint32_t digit_mask = nbins - 1;
    const bool count_nans = s.key_shift == s.key_bits; // first pass
    // Exact zeros (every pruned weight) would all hit bin 0: count them in registers instead.
    const bool zeros_match = prefix == 0;
    const bool compact = s.compact != 0;
    uint64_t *out = p.cand + s.cand_begin;
    const int64_t cap = s.cand_cap, tile0 = s.tile0;
    if (threadIdx.x == 0)
        reservation.matches = 0;
    for (int64_t c0 = a; c0 < b; c0 += kFlushTiles) {
        const int64_t c1 = min(b, c0 + kFlushTiles);
        clear_bins(bins, nbins);
        uint32_t zeros = 0, nans = 0;
        // Whole rounds of kWarps tiles, so that the compacting variant can use block barriers.
        for (int64_t base = c0; base < c1; base += kWarps) {
            const int64_t tile = base + warp;
            uint32_t matches = 0;
            if (tile < c1) {
                uint32_t tile_zeros = 0;
                visit_tile<Global>(p, seg, tile, lane, [&](uint32_t key, int) {
                    nans += count_nans && key > inf;
                    if ((key >> key_shift) != prefix)
                        return;
                    ++matches;
                    if (zeros_match && key == 0)
                        ++tile_zeros;
                    else
                        atomicAdd(&bins[(key >> digit_shift) & digit_mask], 1u);
                });
                zeros += tile_zeros;
                // The first pass never compacts: its slots keep each tile's zeros for the fast path.
                if (count_nans) {
                    tile_zeros = warp_sum(tile_zeros);
                    if (lane == 0 && tile - tile0 < cap)
                        out[tile - tile0] = tile_zeros;
                }
            }
            if (!compact)
                continue;
            int64_t slot = reserve_slots(reservation, matches, &p.counters[seg].fill);
            if (matches == 0)
                continue;
            const int64_t pos0 = (tile - tile0) * kTileElems;
            visit_tile<Global>(p, seg, tile, lane, [&](uint32_t key, int i) {
                if ((key >> key_shift) == prefix && slot < cap)
                    out[slot++] = (uint64_t(key & low_mask) << idx_bits) | static_cast<uint64_t>(pos0 + i);
            });
        }
        zeros = warp_sum(zeros);
        nans = warp_sum(nans);
        if (lane == 0 && zeros != 0) {
            atomicAdd(&bins[0], zeros);
            if (count_nans)
                atomicAdd(&p.counters[seg].zeros, static_cast<unsigned long long>(zeros));
        }
        if (lane == 0 && nans != 0)
            atomicAdd(&p.counters[seg].nan_count, static_cast<unsigned long long>(nans));
        flush_bins(bins, nbins, p.hist + s.hist_row * kBins);
    }
}

// The compacting key pass of a prune step (SegState::fused): besides the histogram of the next
// digit and the composites of the bucket's elements (key >> key_shift == prefix), it writes each
// tile's mask and zeroes its pruned elements. Above the bucket: kept; below: pruned and zeroed;
// in it: pruned in the mask, not zeroed (kFixup decides). Full tiles of 16-byte aligned data with
// an 8-byte aligned mask go in rounds of kVecs vectors a lane, each round held in registers across
// the block's slot reservation, so the weights are read once; partial, misaligned and scaled tiles
// go element by element and are read again for the composites. All tiles of the segment have the
// key reader KT.
template <bool Global, typename KT>
__device__ void build_pass(const PassArgs &p, int64_t seg, const SegState &s, int64_t a, int64_t b, uint32_t *bins) {
    using Bits = typename KT::bits_t;
    // Rounds of slot reservation per vector tile, each holding kVecs vectors a lane in registers
    // until its composites are stored: a whole fp32 tile (64 registers a lane) spilled 252 bytes.
    constexpr int kVecs = 4;
    constexpr int kTileRounds = int(kTileElems) / KT::kPerVec / 32 / kVecs;
    constexpr uint32_t kVecBits = (1u << KT::kPerVec) - 1;
    __shared__ Reservation reservation;
    __shared__ __align__(16) uint8_t staging_all[kWarps][kTileMaskBytes];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    uint8_t *staging = staging_all[warp];
    const uint32_t prefix = s.key_prefix, low_mask = (1u << s.key_shift) - 1;
    const int key_shift = s.key_shift, digit_shift = s.digit_shift, idx_bits = s.idx_bits;
    const int nbins = 1 << s.digit_bits;
    const uint32_t digit_mask = nbins - 1;
    uint64_t *out = p.cand + s.cand_begin;
    const int64_t cap = s.cand_cap, tile0 = s.tile0;
    if (threadIdx.x == 0)
        reservation.matches = 0;
    for (int64_t c0 = a; c0 < b; c0 += kFlushTiles) {
        const int64_t c1 = min(b, c0 + kFlushTiles);
        clear_bins(bins, nbins);
        for (int64_t base = c0; base < c1; base += kWarps) {
            const int64_t tile = base + warp;
            Bits *data = nullptr;
            uint8_t *mask = nullptr;
            int64_t first = 0;
            int count = 0;
            bool vector = false, has_mask = false;
            KT keys{};
            if (tile < c1) {
                const TensorEntry entry = p.table[Global ? entry_of_tile(p.table, p.n, tile) : seg];
                count = tile_count(entry, tile);
                first = (tile - entry.tile_base) * kTileElems;
                keys = KT::at(entry, first);
                data = reinterpret_cast<Bits *>(entry.data);
                mask = reinterpret_cast<uint8_t *>(entry.mask);
                // Without a mask (as kBuildMasks) the tile is only ranked: nothing written.
                has_mask = entry.mask != 0;
                vector = has_mask && vector_tile<KT>(entry.data, count) && entry.mask % 8 == 0;
            }
            const int64_t pos0 = (tile - tile0) * kTileElems;
            // Every thread takes part in every round's reservation (block barriers).
            for (int round = 0; round < kTileRounds; ++round) {
                uint32_t matches = 0;
                uint4 v[kVecs];
                const int vec0 = round * kVecs * 32 + lane; // this lane's first vector of the round
                if (vector) {
                    auto *vecs = reinterpret_cast<uint4 *>(data + first) + round * kVecs * 32;
#pragma unroll
                    for (int j = 0; j < kVecs; ++j)
                        v[j] = vecs[j * 32 + lane];
#pragma unroll
                    for (int j = 0; j < kVecs; ++j) {
                        uint32_t keep = 0, unzeroed = 0;
#pragma unroll
                        for (int q = 0; q < KT::kPerVec; ++q) {
                            const uint32_t key = keys.key(v[j], q, (vec0 + j * 32) * KT::kPerVec + q);
                            const uint32_t high = key >> key_shift;
                            keep |= uint32_t(high > prefix) << q;
                            unzeroed |= uint32_t(high >= prefix) << q;
                            if (high == prefix) {
                                ++matches;
                                atomicAdd(&bins[(key >> digit_shift) & digit_mask], 1u);
                            }
                        }
                        if (unzeroed != kVecBits)
                            store_if_changed(vecs + j * 32 + lane, v[j],
                                             keep_elements<int(sizeof(Bits))>(v[j], unzeroed));
                        stage_vector_bits<KT::kPerVec>(staging, vec0 + j * 32, keep, lane);
                    }
                    if (round == kTileRounds - 1) {
                        __syncwarp();
                        reinterpret_cast<uint64_t *>(mask + first / 8)[lane] =
                            reinterpret_cast<const uint64_t *>(staging)[lane];
                        __syncwarp(); // the staging buffer is rewritten by the warp's next tile
                    }
                } else if (round == 0 && count > 0) {
                    // Step c covers elements [32c, 32c + 32): half of word c / 2, which lane c / 2 keeps.
                    uint64_t word = 0;
#pragma unroll 1 // as for_each_tile_key's element loop
                    for (int c = 0; c * 32 < count; ++c) {
                        const int i = c * 32 + lane;
                        bool keep = false;
                        if (i < count) {
                            const Bits bits = data[first + i];
                            const uint32_t key = keys.key(bits, i);
                            const uint32_t high = key >> key_shift;
                            keep = high > prefix;
                            if (high < prefix && has_mask && bits != 0) // as store_if_changed
                                data[first + i] = Bits(0);
                            if (high == prefix) {
                                ++matches;
                                atomicAdd(&bins[(key >> digit_shift) & digit_mask], 1u);
                            }
                        }
                        const uint32_t ballot = __ballot_sync(kFullWarp, keep);
                        if (lane == c / 2)
                            word |= uint64_t(ballot) << (32 * (c % 2));
                    }
                    if (has_mask)
                        store_tile_word(mask, first, count, word, lane);
                }
                int64_t slot = reserve_slots(reservation, matches, &p.counters[seg].fill);
                if (matches == 0)
                    continue;
                const auto store = [&](uint32_t key, int i) {
                    if ((key >> key_shift) == prefix && slot < cap)
                        out[slot++] = (uint64_t(key & low_mask) << idx_bits) | static_cast<uint64_t>(pos0 + i);
                };
                if (vector) {
#pragma unroll
                    for (int j = 0; j < kVecs; ++j)
#pragma unroll
                        for (int q = 0; q < KT::kPerVec; ++q) {
                            const int offset = (vec0 + j * 32) * KT::kPerVec + q;
                            store(keys.key(v[j], q, offset), offset);
                        }
                } else {
#pragma unroll 1 // as for_each_tile_key's element loop
                    for (int i = lane; i < count; i += 32)
                        store(keys.key(data[first + i], i), i);
                }
            }
        }
        flush_bins(bins, nbins, p.hist + s.hist_row * kBins);
    }
}

template <bool Global>
__device__ void tile_pass(const PassArgs &p, int64_t seg, const SegState &s, int64_t a, int64_t b, uint32_t *bins) {
    a = max(a, s.tile_begin);
    b = min(b, s.tile_end);
    if (a >= b)
        return;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const uint32_t threshold = s.key_prefix;
    const int64_t tile_begin = s.tile_begin;
    const int tile_shift = s.tile_shift;
    const int nbins = static_cast<int>(((s.tile_end - s.tile_begin - 1) >> tile_shift) + 1);
    const uint64_t *counts = p.cand + s.count_begin - s.tile0;
    const int count_shift = s.count_shift;
    for (int64_t c0 = a; c0 < b; c0 += kFlushTiles) {
        const int64_t c1 = min(b, c0 + kFlushTiles);
        clear_bins(bins, nbins);
        if (s.zero_tiles) {
            for (int64_t tile = c0 + threadIdx.x; tile < c1; tile += kThreads) {
                const uint32_t ties = static_cast<uint32_t>(counts[tile] >> count_shift);
                if (ties != 0)
                    atomicAdd(&bins[(tile - tile_begin) >> tile_shift], ties);
            }
        } else {
            for (int64_t tile = c0 + warp; tile < c1; tile += kWarps) {
                uint32_t ties = 0;
                visit_tile<Global>(p, seg, tile, lane, [&](uint32_t key, int) { ties += key == threshold; });
                ties = warp_sum(ties);
                if (lane == 0 && ties != 0)
                    atomicAdd(&bins[(tile - tile_begin) >> tile_shift], ties);
            }
        }
        flush_bins(bins, nbins, p.hist + s.hist_row * kBins);
    }
}

__device__ void buf_pass(const PassArgs &p, int64_t seg, const SegState &s, int64_t a, int64_t b, uint32_t *bins) {
    const int64_t filled = min(static_cast<int64_t>(p.counters[seg].fill), s.cand_cap);
    const int64_t q0 = max(a * kSlotsPerTile, s.cand_begin);
    const int64_t q1 = min(b * kSlotsPerTile, s.cand_begin + filled);
    if (q0 >= q1)
        return;
    const uint64_t prefix = s.comp_prefix;
    const int comp_shift = s.comp_shift, digit_shift = s.digit_shift;
    const int nbins = 1 << s.digit_bits;
    const uint32_t digit_mask = nbins - 1;
    for (int64_t c0 = q0; c0 < q1; c0 += kFlushTiles * kSlotsPerTile) {
        const int64_t c1 = min(q1, c0 + kFlushTiles * kSlotsPerTile);
        clear_bins(bins, nbins);
        for (int64_t q = c0 + threadIdx.x; q < c1; q += kThreads) {
            const uint64_t c = p.cand[q];
            if ((c >> comp_shift) == prefix)
                atomicAdd(&bins[static_cast<uint32_t>(c >> digit_shift) & digit_mask], 1u);
        }
        flush_bins(bins, nbins, p.hist + s.hist_row * kBins);
    }
}

// Sample bracket (select only): before the first pass, one block per large segment reads the keys
// of a sample and picks keys lo <= hi that bracket the target with high probability; one read of
// the segment (kBracketPass) then counts the keys below lo, stores each tile's ties of lo and of
// hi in slots at the end of the segment's, and stores the keys strictly between them as composites
// ((key - lo - 1) << idx_bits | position). The target is then a tie of lo or hi (found from the
// stored counts and one tile scan, as the zero fast path) or a composite (kBuf passes over the
// slots): the weights are read once instead of twice or more. When the bracket misses, or its
// composites overflow the slots, the segment starts the histogram select: one read more. A prune
// step keeps the histogram select, whose compacting pass also builds the masks: two reads in all.
// As cpu/sample_select.cpp, with 2^12-bin digits for the sample's quantiles and ties counted per
// tile (16-bit keys are few, so a bracket's ends hold many ties).
constexpr int kSampleThreads = 512;
constexpr int kSampleRun = 8; // consecutive elements per sampled run: one 32-byte sector of fp32
constexpr int64_t kMinSample = int64_t(1) << 14;
constexpr int64_t kMaxSample = int64_t(1) << 16;
// Segments of at least this many elements are sampled (the sample is at most 1/32 of them).
constexpr int64_t kMinBracketElems = int64_t(1) << 20;
constexpr int kSampleDigitBits = 12;
constexpr int kSampleBins = 1 << kSampleDigitBits;
constexpr double kBracketSigmas = 3.0;   // half-width of the bracket, in standard errors of its rank
constexpr uint32_t kNoKey = 0xffffffffu; // a run past the end of its tile or of null data: not sampled

// Sample size: as many keys as the segment's slots hold beside its tie counts (two a slot: about
// 1/32 of its elements), at most kMaxSample, in whole runs. A bracket's composites must fit the
// same slots, and its width falls as 1 / sqrt(keys): at the median a smaller sample's bracket
// would not fit below about 2^22 elements.
__device__ int64_t sample_size(const SegState &s) {
    const int64_t room = 2 * (s.cand_cap - (s.tile_end - s.tile0));
    return min(kMaxSample, room) / kSampleRun * kSampleRun;
}

// A well-mixed 64-bit hash of a run's number (splitmix64's finalizer): weight layouts repeat with
// strides of their own (kernel taps, heads) that a regular offset could sample one kind of element of.
__device__ __forceinline__ uint64_t mix(uint64_t x) {
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// Keys of the sample into `sample`: runs of kSampleRun consecutive elements, one from each of
// `runs` equal strides of the segment's positions at a hashed offset (aligned to the run length,
// so a run never crosses a tile); runs past the end of a partial tile are kNoKey.
template <bool Global>
__device__ void gather_sample(const PassArgs &p, int64_t seg, const SegState &s, int64_t runs, uint32_t *sample) {
    constexpr int64_t kRunsPerTile = kTileElems / kSampleRun;
    const uint64_t stride = static_cast<uint64_t>((s.tile_end - s.tile0) * kRunsPerTile / runs);
    for (int64_t r = threadIdx.x; r < runs; r += kSampleThreads) {
        const uint64_t hash = mix(static_cast<uint64_t>(r));
        const uint64_t offset = stride >> 32 == 0 ? ((hash >> 32) * stride) >> 32 : div_mod(hash, stride).r;
        const int64_t group = static_cast<int64_t>(uint64_t(r) * stride + offset);
        const int64_t tile = s.tile0 + group / kRunsPerTile;
        const int at = static_cast<int>(group % kRunsPerTile) * kSampleRun;
        uint32_t *out = sample + r * kSampleRun;
        const TensorEntry entry = p.table[Global ? entry_of_tile(p.table, p.n, tile) : seg];
        bool read = false;
        if (at + kSampleRun <= tile_count(entry, tile)) {
            const int64_t first = (tile - entry.tile_base) * kTileElems;
            visit_key_type(entry, Global ? p.space : int32_t(kNative), [&](auto kt) {
                using KT = decltype(kt);
                const KT keys = KT::at(entry, first);
                const auto *bits = reinterpret_cast<const typename KT::bits_t *>(entry.data) + first;
                for (int j = 0; j < kSampleRun; ++j)
                    out[j] = keys.key(bits[at + j], at + j);
                read = true;
            });
        }
        for (int j = 0; j < kSampleRun && !read; ++j)
            out[j] = kNoKey;
    }
}

// Histogram of a digit of the sample's keys whose bits above it are `prefix` (any when all = true).
__device__ void sample_histogram(const uint32_t *sample, int64_t m, uint32_t *bins, int high_shift, uint32_t prefix,
                                 int shift, int digit_bits, bool all) {
    const uint32_t digit_mask = (1u << digit_bits) - 1;
    for (int64_t i = threadIdx.x; i < m; i += kSampleThreads) {
        const uint32_t key = sample[i];
        if (key != kNoKey && (all || key >> high_shift == prefix))
            atomicAdd(&bins[(key >> shift) & digit_mask], 1u);
    }
}

// One block per segment still at its first key pass: the bracket of its target from a sample,
// or nothing (the histogram select goes on) for a segment under kMinBracketElems, whose entries
// have more than one key reader or whose slots hold under kMinSample keys, and when the sample
// holds NaN or too few keys, the bracket's composites would not fit the slots with a margin, or
// they would need more than 63 bits.
template <bool Global> __global__ void __launch_bounds__(kSampleThreads, 1) kSampleBracket(PassArgs p) {
    __shared__ uint32_t coarse[kSampleBins];
    __shared__ uint32_t fine[kSampleBins];
    const int64_t seg = blockIdx.x;
    SegState s = p.state[seg];
    const int64_t tiles = s.tile_end - s.tile0;
    const int64_t m = sample_size(s);
    // The sample lives in the slots until the bracket read; the tie counts go in the last `tiles`.
    if (s.stage != kKey || s.rank < 1 || !s.one_reader || s.elems < kMinBracketElems || m < kMinSample)
        return;
    uint32_t *sample = reinterpret_cast<uint32_t *>(p.cand + s.cand_begin);
    gather_sample<Global>(p, seg, s, m / kSampleRun, sample);
    const int d1 = min(kSampleDigitBits, s.key_bits), shift1 = s.key_bits - d1;
    const int d2 = min(kSampleDigitBits, shift1), shift2 = shift1 - d2;
    for (int b = threadIdx.x; b < kSampleBins; b += kSampleThreads)
        coarse[b] = fine[b] = 0;
    __syncthreads(); // the sample is written, the bins clear
    int64_t valid = 0, nans = 0;
    for (int64_t i = threadIdx.x; i < m; i += kSampleThreads) {
        const uint32_t key = sample[i];
        valid += key != kNoKey;
        nans += key != kNoKey && key > s.inf;
    }
    sample_histogram(sample, m, coarse, 0, 0, shift1, d1, true);
    block_exclusive_sum<kSampleThreads>(valid, valid);
    block_exclusive_sum<kSampleThreads>(nans, nans);
    if (nans > 0 || valid < kMinSample / 2)
        return;
    // The bracket: kBracketSigmas standard errors of the target's rank in the sample either side
    // of it, measured from the spread between runs (neighbouring weights share a row's or a
    // filter's scale, so a run's elements are not independent), the binomial error the floor.
    const double q = static_cast<double>(s.rank) / static_cast<double>(s.elems);
    const double centre = q * static_cast<double>(valid);
    const Bucket mid = find_bucket<kSampleThreads>(coarse, 1 << d1, min(static_cast<int64_t>(centre), valid - 1) + 1);
    const uint32_t edge = static_cast<uint32_t>(max(mid.bin, 0)) << shift1; // a key near the target
    int64_t sum = 0, squares = 0, runs = 0;
    for (int64_t r = threadIdx.x; r < m / kSampleRun; r += kSampleThreads) {
        if (sample[r * kSampleRun] == kNoKey)
            continue;
        int64_t below = 0;
        for (int j = 0; j < kSampleRun; ++j)
            below += sample[r * kSampleRun + j] < edge;
        sum += below;
        squares += below * below;
        ++runs;
    }
    block_exclusive_sum<kSampleThreads>(sum, sum);
    block_exclusive_sum<kSampleThreads>(squares, squares);
    block_exclusive_sum<kSampleThreads>(runs, runs);
    const double n_runs = static_cast<double>(runs), s1 = static_cast<double>(sum);
    const double run_variance = fmax(0.0, (static_cast<double>(squares) - s1 * s1 / n_runs) / fmax(n_runs - 1, 1.0));
    const double rank_error = sqrt(fmax(n_runs * run_variance, centre * (1 - q)));
    const double spread = kBracketSigmas * rank_error + 1;
    const int64_t lo_rank = static_cast<int64_t>(floor(centre - spread)); // 0-based sample ranks
    const int64_t hi_rank = static_cast<int64_t>(ceil(centre + spread));
    const Bucket lo_bin = lo_rank >= 0 ? find_bucket<kSampleThreads>(coarse, 1 << d1, lo_rank + 1) : Bucket{-1, 0, 0};
    const Bucket hi_bin =
        hi_rank < valid ? find_bucket<kSampleThreads>(coarse, 1 << d1, hi_rank + 1) : Bucket{-1, 0, 0};
    __syncthreads(); // coarse is read: it takes hi's digit
    for (int b = threadIdx.x; b < kSampleBins; b += kSampleThreads)
        coarse[b] = 0;
    __syncthreads();
    if (lo_bin.bin >= 0)
        sample_histogram(sample, m, fine, shift1, static_cast<uint32_t>(lo_bin.bin), shift2, d2, false);
    if (hi_bin.bin >= 0)
        sample_histogram(sample, m, coarse, shift1, static_cast<uint32_t>(hi_bin.bin), shift2, d2, false);
    __syncthreads();
    // lo: the lower edge of the fine bin holding lo_rank; hi: the upper edge of hi_rank's. The
    // sample's keys below lo and up to hi are then known exactly.
    uint32_t lo = 0, hi = s.inf;
    int64_t below_lo = 0, up_to_hi = valid;
    if (lo_bin.bin >= 0) {
        const Bucket f = find_bucket<kSampleThreads>(fine, 1 << d2, lo_rank + 1 - lo_bin.below);
        lo = ((static_cast<uint32_t>(lo_bin.bin) << d2) | static_cast<uint32_t>(max(f.bin, 0))) << shift2;
        below_lo = lo_bin.below + f.below;
    }
    if (hi_bin.bin >= 0) {
        const Bucket f = find_bucket<kSampleThreads>(coarse, 1 << d2, hi_rank + 1 - hi_bin.below);
        const uint32_t top = (static_cast<uint32_t>(hi_bin.bin) << d2) | static_cast<uint32_t>(max(f.bin, 0));
        hi = min(s.inf, ((top + 1) << shift2) - 1);
        up_to_hi = hi_bin.below + f.below + f.count;
    }
    // The sample's ties of lo and hi, which the read counts per tile instead of storing (round
    // values are common: pruned zeros, 16-bit weights in the wide space, infinities).
    int64_t lo_ties = 0, hi_ties = 0;
    for (int64_t i = threadIdx.x; i < m; i += kSampleThreads) {
        lo_ties += sample[i] == lo;
        hi_ties += sample[i] == hi && hi != lo;
    }
    block_exclusive_sum<kSampleThreads>(lo_ties, lo_ties);
    block_exclusive_sum<kSampleThreads>(hi_ties, hi_ties);
    if (threadIdx.x != 0 || lo > hi)
        return;
    // Composites expected from the sample's keys strictly inside, with three standard errors.
    const int64_t inside = max(int64_t(0), up_to_hi - below_lo - lo_ties - hi_ties);
    const double per_key = static_cast<double>(s.elems) / static_cast<double>(valid);
    const double expected = (static_cast<double>(inside) + 3 * sqrt(static_cast<double>(inside) + 1)) * per_key;
    const int offset_bits = bit_length(hi - lo);
    if (expected > static_cast<double>(s.cand_cap - tiles) || offset_bits + s.idx_bits > 63)
        return;
    s.bracket_lo = lo;
    s.bracket_hi = hi;
    s.count_begin = s.cand_begin + s.cand_cap - tiles;
    s.stage = kBracket;
    p.state[seg] = s;
}

// The read of a kBracket segment's tiles [a, b) (every entry with the key reader KT): per tile the
// ties of lo and of hi into its count slot, the keys strictly between them as composites, and
// the keys below lo and the NaNs counted. A lane remembers which of its vectors (or elements, off
// the vector path) held a composite and reads only those again after the block's slot
// reservation (a few percent of the tile, just read): holding its whole share of the tile in
// registers across the reservation spilled.
template <bool Global, typename KT>
__device__ void bracket_pass(const PassArgs &p, int64_t seg, const SegState &s, int64_t a, int64_t b) {
    using Bits = typename KT::bits_t;
    constexpr int kVecs = int(kTileElems) / KT::kPerVec / 32; // vectors per lane
    constexpr int kSteps = int(kTileElems) / 32;              // elements per lane off the vector path
    static_assert(kVecs <= 64 && kSteps <= 64, "a lane's vectors and steps fit `held`");
    __shared__ Reservation reservation;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const uint32_t lo = s.bracket_lo, hi = s.bracket_hi, inf = s.inf;
    const int idx_bits = s.idx_bits;
    const int64_t tile0 = s.tile0, cap = s.cand_cap - (s.tile_end - s.tile0);
    uint64_t *out = p.cand + s.cand_begin;
    uint64_t *tie_counts = p.cand + s.count_begin - tile0;
    int64_t below = 0, nans = 0, lo_total = 0, hi_total = 0; // lane 0's sums of its warp's tiles
    if (threadIdx.x == 0)
        reservation.matches = 0;
    __syncthreads();
    // Whole rounds of kWarps tiles, so that all threads reserve slots together.
    for (int64_t base = a; base < b; base += kWarps) {
        const int64_t tile = base + warp;
        uint32_t matches = 0, lo_ties = 0, hi_ties = 0, tile_below = 0, tile_nans = 0;
        uint64_t held = 0; // bit j: vector j (or step j) of the lane held a composite
        const auto count_key = [&](uint32_t key) {
            tile_nans += key > inf;
            tile_below += key < lo;
            lo_ties += key == lo;
            hi_ties += key == hi && hi != lo;
            const bool inside = key > lo && key < hi;
            matches += inside;
            return inside;
        };
        const Bits *data = nullptr;
        int64_t first = 0;
        int count = 0;
        bool vector = false;
        KT keys{};
        if (tile < b) {
            const TensorEntry entry = p.table[Global ? entry_of_tile(p.table, p.n, tile) : seg];
            count = tile_count(entry, tile);
            first = (tile - entry.tile_base) * kTileElems;
            keys = KT::at(entry, first);
            data = reinterpret_cast<const Bits *>(entry.data) + first;
            vector = vector_tile<KT>(entry.data, count);
            for_each_tile_key<KT>(entry, first, count, lane, [&](uint32_t key, int offset) {
                // Offset (j * 32 + lane) * kPerVec + q on the vector path, c * 32 + lane off it.
                if (count_key(key))
                    held |= uint64_t(1) << ((vector ? offset / KT::kPerVec : offset) / 32);
            });
            lo_ties = warp_sum(lo_ties);
            hi_ties = warp_sum(hi_ties);
            tile_below = warp_sum(tile_below);
            tile_nans = warp_sum(tile_nans);
            if (lane == 0) {
                tie_counts[tile] = (uint64_t(hi_ties) << 32) | lo_ties;
                lo_total += lo_ties;
                hi_total += hi_ties;
                below += tile_below;
                nans += tile_nans;
            }
        }
        int64_t slot = reserve_slots(reservation, matches, &p.counters[seg].fill);
        const int64_t pos0 = (tile - tile0) * kTileElems;
        const auto store = [&](uint32_t key, int i) {
            if (key > lo && key < hi && slot < cap)
                out[slot++] = (uint64_t(key - lo - 1) << idx_bits) | static_cast<uint64_t>(pos0 + i);
        };
        for (; held != 0; held &= held - 1) {
            const int j = bit_length(held & (~held + 1)) - 1; // the lowest set bit
            if (vector) {
                const uint4 x = __ldg(reinterpret_cast<const uint4 *>(data) + j * 32 + lane);
#pragma unroll
                for (int q = 0; q < KT::kPerVec; ++q) {
                    const int offset = (j * 32 + lane) * KT::kPerVec + q;
                    store(keys.key(x, q, offset), offset);
                }
            } else {
                store(keys.key(data[j * 32 + lane], j * 32 + lane), j * 32 + lane);
            }
        }
    }
    block_exclusive_sum(below, below);
    block_exclusive_sum(nans, nans);
    block_exclusive_sum(lo_total, lo_total);
    block_exclusive_sum(hi_total, hi_total);
    if (threadIdx.x != 0)
        return;
    SegCounters &c = p.counters[seg];
    if (below != 0)
        atomicAdd(&c.below, static_cast<unsigned long long>(below));
    if (nans != 0)
        atomicAdd(&c.nan_count, static_cast<unsigned long long>(nans));
    if (lo_total != 0)
        atomicAdd(&c.lo_ties, static_cast<unsigned long long>(lo_total));
    if (hi_total != 0)
        atomicAdd(&c.hi_ties, static_cast<unsigned long long>(hi_total));
}

// The bracket read: a persistent grid as kPass's, over the segments at kBracket.
template <bool Global> __global__ void __launch_bounds__(kThreads, 2) kBracketPass(PassArgs p) {
    for_each_segment_range<Global>(p, [&](int64_t seg, int64_t a, int64_t b) {
        const SegState s = p.state[seg];
        if (s.stage != kBracket)
            return;
        // One key reader for the segment (SegState::one_reader, which kSampleBracket requires).
        visit_key_type(p.table[Global ? 0 : seg], Global ? p.space : int32_t(kNative),
                       [&](auto kt) { bracket_pass<Global, decltype(kt)>(p, seg, s, a, b); });
    });
}

// Prune: the variant of a prune step, whose fused segments build their masks in the compacting pass.
// At least 2 blocks per SM: without the bound the per-layer prune variant takes 249 registers
// (1 block per SM, for every pass of the step), with it 128.
template <bool Global, bool Prune> __global__ void __launch_bounds__(kThreads, 2) kPass(PassArgs p) {
    __shared__ uint32_t bins[kBins];
    for_each_segment_range<Global>(p, [&](int64_t seg, int64_t a, int64_t b) {
        const SegState s = p.state[seg];
        if (Prune && s.stage == kKey && s.fused) {
            // Global: every entry has the reader of the first (SegState::one_reader). Keys are
            // native (run_passes fuses no other space), so no wide reader is compiled in.
            visit_key_type(p.table[Global ? 0 : seg], kNative,
                           [&](auto kt) { build_pass<Global, decltype(kt)>(p, seg, s, a, b, bins); });
        } else if (s.stage == kKey) {
            key_pass<Global>(p, seg, s, a, b, bins);
        } else if (s.stage == kTile) {
            tile_pass<Global>(p, seg, s, a, b, bins);
        } else if (s.stage == kBuf) {
            buf_pass(p, seg, s, a, b, bins);
        }
    });
}

// The target is the rank-th tie of `key`, whose count per tile a read stored at count_shift.
__device__ void target_tie(SegState &s, uint32_t key, int32_t count_shift, int64_t rank) {
    s.rank = rank;
    s.key_prefix = key;
    s.key_shift = 0;
    s.zero_tiles = 1;
    s.count_shift = count_shift;
    narrow_tiles(s);
}

// After a bracket read: the target among the ties of lo, the composites and the ties
// of hi, in that order; or, when the bracket missed it (or NaN was read), as after a first pass.
__device__ void resolve_bracket(SegState &s, SegCounters &c) {
    if (c.nan_count > 0) {
        finish(s, 0, -1);
        return;
    }
    const int64_t fill = static_cast<int64_t>(c.fill), cap = s.cand_cap - (s.tile_end - s.tile0);
    int64_t rank = s.rank - static_cast<int64_t>(c.below);
    if (rank >= 1 && rank <= static_cast<int64_t>(c.lo_ties))
        return target_tie(s, s.bracket_lo, 0, rank);
    rank -= static_cast<int64_t>(c.lo_ties);
    if (rank >= 1 && rank <= fill && fill <= cap) {
        // The composites' order is the keys' and positions' order: go on as after a compacting pass.
        s.rank = rank;
        s.key_base = s.bracket_lo + 1;
        s.key_prefix = 0;
        s.key_shift = bit_length(s.bracket_hi - s.bracket_lo);
        s.cand_cap = cap;
        rank_composites(s, 0, s.key_shift + s.idx_bits);
        return;
    }
    rank -= fill;
    if (rank >= 1 && rank <= static_cast<int64_t>(c.hi_ties))
        return target_tie(s, s.bracket_hi, 32, rank);
    c = SegCounters{};
    s.count_begin = s.cand_begin;
    start_keys(s);
}

// One thread per segment: resolves those at kBracket, leaves the others to the passes.
__global__ void __launch_bounds__(kThreads) kResolveBracket(SegState *state, SegCounters *counters, int64_t segments) {
    const int64_t seg = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (seg >= segments || state[seg].stage != kBracket)
        return;
    SegState s = state[seg];
    resolve_bracket(s, counters[seg]);
    state[seg] = s;
}

// One block per segment: picks the bucket of the pass just run and zeroes the histogram row for
// the next pass.
// fuse: a prune step's segments build their masks in the compacting pass.
__global__ void __launch_bounds__(kThreads)
    kResolve(SegState *state, const SegCounters *counters, unsigned long long *hist, int32_t fuse) {
    const int64_t seg = blockIdx.x;
    SegState s = state[seg];
    if (s.stage != kKey && s.stage != kBuf && s.stage != kTile)
        return;
    if (s.stage == kKey && (s.rank == 0 || counters[seg].nan_count > 0)) {
        // k == 0 or NaN weights: known after the first pass (which counted the NaNs); prune nothing.
        if (threadIdx.x == 0) {
            finish(s, 0, -1);
            state[seg] = s;
        }
        return;
    }
    unsigned long long *row = hist + s.hist_row * kBins;
    const int nbins =
        s.stage == kTile ? static_cast<int>(((s.tile_end - s.tile_begin - 1) >> s.tile_shift) + 1) : 1 << s.digit_bits;
    const Bucket b = find_bucket(row, nbins, s.rank);
    for (int i = threadIdx.x; i < nbins; i += kThreads)
        row[i] = 0;
    if (threadIdx.x != 0)
        return;
    if (b.bin < 0) {
        finish(s, s.key_prefix, -1);
    } else if (s.stage == kKey && s.key_shift == s.key_bits && counters[seg].zeros >= uint64_t(s.rank) &&
               s.tile_end - s.tile0 <= s.cand_cap) {
        // Zero fast path: the target is the rank-th zero; its tile comes from the stored counts.
        s.key_prefix = 0;
        s.key_shift = 0;
        s.zero_tiles = 1;
        narrow_tiles(s);
    } else {
        s.rank -= b.below;
        const uint32_t bin = static_cast<uint32_t>(b.bin);
        if (s.stage == kKey)
            after_key_digit(s, bin, b.count);
        else if (s.stage == kBuf)
            after_comp_digit(s, bin);
        else
            after_tile_digit(s, bin);
        if (fuse && s.one_reader && s.stage == kKey && s.compact)
            s.fused = 1;
    }
    state[seg] = s;
}

// One warp per segment in kScan: the rank-th element equal to the threshold key in the tile.
template <bool Global>
__global__ void __launch_bounds__(32) kScanTile(const TensorEntry *table, int64_t n, SegState *state, int32_t space) {
    const int64_t seg = blockIdx.x;
    SegState s = state[seg];
    if (s.stage != kScan)
        return;
    const int lane = threadIdx.x;
    const int64_t tile = s.tile_begin;
    const TensorEntry entry = table[Global ? entry_of_tile(table, n, tile) : seg];
    const int count = tile_count(entry, tile);
    const int64_t first = (tile - entry.tile_base) * kTileElems;
    const uint32_t threshold = s.key_prefix;
    int64_t rank = s.rank;
    int found = -1;
    visit_key_type(entry, space, [&](auto kt) {
        using KT = decltype(kt);
        const KT keys = KT::at(entry, first);
        const auto *bits = reinterpret_cast<const typename KT::bits_t *>(entry.data) + first;
        for (int c = 0; c < count; c += 32) {
            const bool tie = c + lane < count && keys.key(bits[c + lane], c + lane) == threshold;
            const uint32_t ties = __ballot_sync(kFullWarp, tie);
            if (rank <= __popc(ties)) {
                const int before = __popc(ties & ((1u << lane) - 1));
                const uint32_t hit = __ballot_sync(kFullWarp, tie && before + 1 == rank);
                found = c + __ffs(hit) - 1;
                return;
            }
            rank -= __popc(ties);
        }
    });
    if (lane != 0)
        return;
    finish(s, threshold, found < 0 ? -1 : (tile - s.tile0) * kTileElems + found);
    state[seg] = s;
}

// Output rows.

// built (prune steps, else null): 1 for the entries whose masks the fused pass built.
__global__ void __launch_bounds__(kThreads)
    kFinishLayerwise(const TensorEntry *table, const SegState *state, const SegCounters *counters, int64_t n,
                     Selection *out, int32_t *built) {
    const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (e >= n)
        return;
    const SegState &s = state[e];
    const bool done = s.stage == kDone;
    out[e] = Selection{done ? int64_t(s.key_prefix) : 0, done ? s.result_pos : -1, entry_key_space(table[e], kNative),
                       static_cast<int64_t>(counters[e].nan_count)};
    if (built != nullptr)
        built[e] = s.fused;
}

__global__ void __launch_bounds__(kThreads)
    kFinishGlobal(const TensorEntry *table, int64_t n, const SegState *state, const SegCounters *counters,
                  int32_t space, Selection *out, int32_t *built) {
    const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (e >= n)
        return;
    const SegState &s = state[0];
    const bool done = s.stage == kDone;
    const int64_t pos = done ? s.result_pos : -1;
    int64_t index = -1;
    if (pos >= 0) {
        // Entries before the threshold element's entry prune all their ties, entries after it none.
        const int64_t owner = entry_of_tile(table, n, pos / kTileElems);
        const TensorEntry entry = table[e];
        index = e < owner ? entry.numel - 1 : e > owner ? -1 : pos - entry.tile_base * kTileElems;
    }
    out[e] = Selection{done ? int64_t(s.key_prefix) : 0, index, space, static_cast<int64_t>(counters[0].nan_count)};
    if (built != nullptr)
        built[e] = s.fused;
}

// A prune step's last launch: the bucket's composites that a fused segment stored are compared
// with its threshold's; the elements above it get their mask bit, the others are zeroed. One
// thread per candidate slot (slots mirror tiles, so a slot's tile names its segment in layerwise
// mode).
template <bool Global>
__global__ void __launch_bounds__(kThreads) kFixup(const TensorEntry *table, int64_t n, const SegState *state,
                                                   const SegCounters *counters, const uint64_t *cand, int64_t slots) {
    for (int64_t q = int64_t(blockIdx.x) * kThreads + threadIdx.x; q < slots; q += int64_t(gridDim.x) * kThreads) {
        const int64_t seg = Global ? 0 : entry_of_tile(table, n, q / kSlotsPerTile);
        const SegState &s = state[seg];
        if (!s.fused || s.stage != kDone || s.result_pos < 0)
            continue;
        const int64_t filled = min(static_cast<int64_t>(counters[seg].fill), s.cand_cap);
        if (q < s.cand_begin || q >= s.cand_begin + filled)
            continue;
        const uint64_t c = cand[q];
        const uint64_t low_mask = (uint64_t(1) << s.key_shift) - 1;
        const uint64_t cut = ((uint64_t(s.key_prefix) & low_mask) << s.idx_bits) | static_cast<uint64_t>(s.result_pos);
        const int64_t pos = static_cast<int64_t>(c & ((uint64_t(1) << s.idx_bits) - 1));
        const TensorEntry entry = table[Global ? entry_of_tile(table, n, pos / kTileElems) : seg];
        const int64_t i = pos - (Global ? entry.tile_base * kTileElems : 0);
        if (entry.mask == 0) // as kBuildMasks: an entry without a mask is left as it is
            continue;
        if (c > cut) {
            // Other threads set other bits of the same word: an atomic on the aligned 32-bit word.
            const uintptr_t byte = static_cast<uintptr_t>(entry.mask) + static_cast<uintptr_t>(i / 8);
            const uint32_t bit = uint32_t(1) << ((byte % 4) * 8 + i % 8);
            atomicOr(reinterpret_cast<unsigned int *>(byte - byte % 4), bit);
        } else if (entry.dtype == kFloat32) {
            reinterpret_cast<uint32_t *>(entry.data)[i] = 0;
        } else {
            reinterpret_cast<uint16_t *>(entry.data)[i] = 0;
        }
    }
}

// Host side.

constexpr int64_t round_up(int64_t x, int64_t a) { return ceil_div(x, a) * a; }

// Bytes zeroed by every call: plans, counters, histogram rows (resolve re-zeroes what it reads)
// and one built flag per entry.
int64_t fixed_bytes(int64_t segments, int64_t rows, int64_t entries) {
    return round_up(segments * int64_t(sizeof(SegState)), 256) +
           round_up(segments * int64_t(sizeof(SegCounters)), 256) + rows * kBins * int64_t(sizeof(unsigned long long)) +
           round_up(entries * int64_t(sizeof(int32_t)), 256);
}

int64_t layerwise_rows(int64_t n, int64_t tiles) { return std::min(n, tiles / kMinLargeTiles); }

struct Scratch {
    SegState *state;
    SegCounters *counters;
    unsigned long long *hist;
    int32_t *built;
    uint64_t *cand;
    int64_t slots;
    int64_t fixed;
};

Scratch carve(void *scratch, int64_t bytes, int64_t segments, int64_t rows, int64_t entries, int64_t total_tiles) {
    const int64_t fixed = fixed_bytes(segments, rows, entries);
    const int64_t needed = fixed + total_tiles * kSlotsPerTile * int64_t(sizeof(uint64_t));
    GMP_CHECK(scratch != nullptr, "scratch pointer is null");
    GMP_CHECK(reinterpret_cast<uintptr_t>(scratch) % 16 == 0, "scratch must be 16-byte aligned");
    GMP_CHECK(bytes >= needed, "scratch has ", bytes, " bytes, the selection needs ", needed,
              " (see select_scratch_bytes)");
    char *base = static_cast<char *>(scratch);
    const int64_t counters_at = round_up(segments * int64_t(sizeof(SegState)), 256);
    const int64_t hist_at = counters_at + round_up(segments * int64_t(sizeof(SegCounters)), 256);
    const int64_t built_at = hist_at + rows * kBins * int64_t(sizeof(unsigned long long));
    return Scratch{reinterpret_cast<SegState *>(base),
                   reinterpret_cast<SegCounters *>(base + counters_at),
                   reinterpret_cast<unsigned long long *>(base + hist_at),
                   reinterpret_cast<int32_t *>(base + built_at),
                   reinterpret_cast<uint64_t *>(base + fixed),
                   (bytes - fixed) / int64_t(sizeof(uint64_t)),
                   fixed};
}

void check_sizes(int64_t n, int64_t total_tiles) {
    GMP_CHECK(n >= 0 && n <= INT32_MAX, "table size must be in [0, 2^31), got ", n);
    GMP_CHECK(total_tiles >= 0 && total_tiles <= kMaxTiles, "total_tiles must be in [0, 2^41], got ", total_tiles);
}

// fuse (Prune only): the segments' compacting passes build their masks.
template <bool Global, bool Prune>
void run_passes(const PassArgs &args, int64_t segments, bool fuse, cudaStream_t stream) {
    const int blocks = persistent_blocks(kPass<Global, Prune>, kThreads, args.total_tiles);
    const unsigned grid = static_cast<unsigned>(segments);
    for (int pass = 0; pass < kMaxPasses; ++pass) {
        kPass<Global, Prune><<<blocks, kThreads, 0, stream>>>(args);
        GMP_CUDA_CHECK(cudaGetLastError());
        kResolve<<<grid, kThreads, 0, stream>>>(args.state, args.counters, args.hist, Prune && fuse ? 1 : 0);
        GMP_CUDA_CHECK(cudaGetLastError());
    }
    kScanTile<Global><<<grid, 32, 0, stream>>>(args.table, args.n, args.state, args.space);
    GMP_CUDA_CHECK(cudaGetLastError());
}

unsigned row_blocks(int64_t n) { return static_cast<unsigned>(ceil_div<int64_t>(n, kThreads)); }

// The sample bracket (select only: kSampleBracket, its read, its resolve) before the passes, when
// a segment may be large enough to be sampled.
template <bool Global> void run_bracket(const PassArgs &args, int64_t segments, cudaStream_t stream) {
    if (args.total_tiles * kTileElems < kMinBracketElems)
        return;
    const unsigned grid = static_cast<unsigned>(segments);
    kSampleBracket<Global><<<grid, kSampleThreads, 0, stream>>>(args);
    GMP_CUDA_CHECK(cudaGetLastError());
    const int blocks = persistent_blocks(kBracketPass<Global>, kThreads, args.total_tiles);
    kBracketPass<Global><<<blocks, kThreads, 0, stream>>>(args);
    GMP_CUDA_CHECK(cudaGetLastError());
    kResolveBracket<<<row_blocks(segments), kThreads, 0, stream>>>(args.state, args.counters, segments);
    GMP_CUDA_CHECK(cudaGetLastError());
}

// The selection of select_layerwise, and with Prune the rest of the step: the fixup of the fused
// entries, then build_masks (zeroing the pruned) of the others.
template <bool Prune>
void layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, void *scratch,
               int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream) {
    check_sizes(n, total_tiles);
    if (n == 0)
        return;
    GMP_CHECK(table != nullptr && k != nullptr && out != nullptr, "table, k and out pointers must not be null");
    const int64_t rows = layerwise_rows(n, total_tiles);
    const Scratch sc = carve(scratch, scratch_bytes, n, rows, n, total_tiles);
    const cudaStream_t s = as_stream(stream);
    GMP_CUDA_CHECK(cudaMemsetAsync(scratch, 0, static_cast<size_t>(sc.fixed), s));
    kInitLayerwise<<<1, kThreads, 0, s>>>(table, n, k, sc.state, rows, sc.slots);
    GMP_CUDA_CHECK(cudaGetLastError());
    kSelectSmall<<<static_cast<unsigned>(n), kThreads, 0, s>>>(table, sc.state, sc.counters);
    GMP_CUDA_CHECK(cudaGetLastError());
    const PassArgs args{table, n, sc.state, sc.counters, sc.hist, sc.cand, total_tiles, kNative};
    if constexpr (!Prune)
        run_bracket<false>(args, n, s);
    run_passes<false, Prune>(args, n, true, s);
    kFinishLayerwise<<<row_blocks(n), kThreads, 0, s>>>(table, sc.state, sc.counters, n, out,
                                                        Prune ? sc.built : nullptr);
    GMP_CUDA_CHECK(cudaGetLastError());
    if constexpr (Prune) {
        const int64_t slots = total_tiles * kSlotsPerTile;
        const int blocks = persistent_blocks(kFixup<false>, kThreads, ceil_div<int64_t>(slots, 32));
        kFixup<false><<<blocks, kThreads, 0, s>>>(table, n, sc.state, sc.counters, sc.cand, slots);
        GMP_CUDA_CHECK(cudaGetLastError());
        build_masks_except(table, n, out, sc.built, total_tiles, stream, true);
    }
}

template <bool Prune>
void global(const TensorEntry *table, int64_t n, const int64_t *k, int32_t key_space, Selection *out, void *scratch,
            int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream) {
    check_sizes(n, total_tiles);
    GMP_CHECK(key_space == kNative || key_space == kWide, "unknown key space ", key_space);
    if (n == 0)
        return;
    GMP_CHECK(table != nullptr && k != nullptr && out != nullptr, "table, k and out pointers must not be null");
    const Scratch sc = carve(scratch, scratch_bytes, 1, 1, n, total_tiles);
    const cudaStream_t s = as_stream(stream);
    GMP_CUDA_CHECK(cudaMemsetAsync(scratch, 0, static_cast<size_t>(sc.fixed), s));
    kInitGlobal<<<1, kThreads, 0, s>>>(table, n, k, key_space, sc.state, total_tiles, sc.slots);
    GMP_CUDA_CHECK(cudaGetLastError());
    const PassArgs args{table, n, sc.state, sc.counters, sc.hist, sc.cand, total_tiles, key_space};
    // The fused pass reads a segment's tiles with one key reader: not for mixed dtypes (wide keys),
    // nor for scaled and unscaled entries together (SegState::one_reader).
    if constexpr (!Prune)
        run_bracket<true>(args, 1, s);
    run_passes<true, Prune>(args, 1, key_space == kNative, s);
    kFinishGlobal<<<row_blocks(n), kThreads, 0, s>>>(table, n, sc.state, sc.counters, key_space, out,
                                                     Prune ? sc.built : nullptr);
    GMP_CUDA_CHECK(cudaGetLastError());
    if constexpr (Prune) {
        const int64_t slots = total_tiles * kSlotsPerTile;
        const int blocks = persistent_blocks(kFixup<true>, kThreads, ceil_div<int64_t>(slots, 32));
        kFixup<true><<<blocks, kThreads, 0, s>>>(table, n, sc.state, sc.counters, sc.cand, slots);
        GMP_CUDA_CHECK(cudaGetLastError());
        build_masks_except(table, n, out, sc.built, total_tiles, stream, true);
    }
}

} // namespace

int64_t select_scratch_bytes(int64_t n, int64_t total_numel, int32_t mode) {
    GMP_CHECK(n >= 0, "n must be >= 0, got ", n);
    GMP_CHECK(total_numel >= 0 && total_numel <= kMaxTiles * kTileElems, "total_numel must be in [0, 2^52], got ",
              total_numel);
    GMP_CHECK(mode == 0 || mode == 1, "mode must be 0 (layerwise) or 1 (global), got ", mode);
    if (n == 0)
        return 0;
    // Each entry adds at most one partial tile.
    const int64_t tiles = ceil_div<int64_t>(total_numel, kTileElems) + n;
    const int64_t bytes = mode == 0 ? fixed_bytes(n, layerwise_rows(n, tiles), n) : fixed_bytes(1, 1, n);
    return bytes + tiles * kSlotsPerTile * int64_t(sizeof(uint64_t));
}

void select_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, void *scratch,
                      int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream) {
    layerwise<false>(table, n, k, out, scratch, scratch_bytes, total_tiles, stream);
}

void select_global(const TensorEntry *table, int64_t n, const int64_t *k, int32_t key_space, Selection *out,
                   void *scratch, int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream) {
    global<false>(table, n, k, key_space, out, scratch, scratch_bytes, total_tiles, stream);
}

void prune_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, void *scratch,
                     int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream) {
    layerwise<true>(table, n, k, out, scratch, scratch_bytes, total_tiles, stream);
}

void prune_global(const TensorEntry *table, int64_t n, const int64_t *k, int32_t key_space, Selection *out,
                  void *scratch, int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream) {
    global<true>(table, n, k, key_space, out, scratch, scratch_bytes, total_tiles, stream);
}

} // namespace gmp::cuda
