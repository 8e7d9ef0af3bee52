// Device-side helpers shared by the CUDA kernels: error checks, the stream handle, the
// tile -> table-entry lookup of the flat persistent grids, and the per-tile key readers.
#pragma once

#include "../common/bitpack.h"
#include "../common/checks.h"
#include "../common/dtype.h"
#include "../common/keys.h"
#include "../common/tensor_table.h"
#include "../ops.h"

#include <cuda_runtime.h>

#include <algorithm>

#define GMP_CUDA_CHECK(expr)                                                                                           \
    do {                                                                                                               \
        const cudaError_t gmp_err = (expr);                                                                            \
        GMP_RUNTIME_CHECK(gmp_err == cudaSuccess, #expr, " failed: ", cudaGetErrorString(gmp_err));                    \
    } while (0)

namespace gmp::cuda {

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// build_masks (bitmask.cu) skipping the entries e with built[e] != 0 (built in device memory, or
// null for none): the entries a fused prune step built during its selection (select.cu). `kept`
// (device memory, or null): as build_masks' (a skipped entry's count stays 0).
void build_masks_except(const TensorEntry *table, int64_t n, const Selection *selection, const int32_t *built,
                        int64_t total_tiles, uintptr_t stream, bool zero_pruned, int64_t *kept = nullptr);

// Grid size of a persistent `kernel` over `work_items` items, a warp each: one wave, as many
// blocks of `threads_per_block` as the kernel's occupancy fits on every SM of the current device
// at once (its registers decide: 2 blocks of 256 threads for the 90-125-register streaming
// kernels on sm_90, which a fixed 4 per SM ran in two waves), and no more blocks than the items
// keep busy.
template <typename Kernel> int persistent_blocks(Kernel kernel, int threads_per_block, int64_t work_items) {
    int device = 0, sms = 0, per_sm = 0;
    GMP_CUDA_CHECK(cudaGetDevice(&device));
    GMP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    GMP_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads_per_block, 0));
    const int64_t wanted = ceil_div<int64_t>(work_items, threads_per_block / 32);
    return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(std::max(per_sm, 1)) * sms)));
}

// Entry e with table[e].tile_base <= tile < table[e + 1].tile_base (bases ascend with e).
__device__ __forceinline__ int64_t entry_of_tile(const TensorEntry *table, int64_t n, int64_t tile) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (table[mid].tile_base <= tile)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ uint32_t warp_sum(uint32_t v) {
    for (int offset = 16; offset > 0; offset /= 2)
        v += __shfl_xor_sync(kFullWarp, v, offset);
    return v;
}

// Number of bits needed to write x (0 for 0).
__device__ __forceinline__ int bit_length(uint64_t x) { return x == 0 ? 0 : 64 - __clzll(static_cast<long long>(x)); }

// x / d and x % d (d >= 1) without `/` and `%` on 64-bit operands, which ptxas compiles to calls
// of its division subroutine: a call in a pass kernel costs it registers (saved around the call)
// and its unscaled vector loops spill. 32-bit division when both fit (entries under 2^32
// elements), else binary long division.
struct DivMod {
    uint64_t q, r;
};
__device__ __forceinline__ DivMod div_mod(uint64_t x, uint64_t d) {
    if ((x | d) >> 32 == 0)
        return {uint32_t(x) / uint32_t(d), uint32_t(x) % uint32_t(d)};
    DivMod a{0, 0};
#pragma unroll 1
    for (int b = bit_length(x) - 1; b >= 0; --b) {
        a.r = (a.r << 1) | ((x >> b) & 1); // a.r < d < 2^63: no overflow
        if (a.r >= d) {
            a.r -= d;
            a.q |= uint64_t(1) << b;
        }
    }
    return a;
}

// A scaled entry's factors (TensorEntry::scale) over a span of at most kScaleSpan consecutive
// elements from element `first`: element first + o takes scale[((first + o) / inner) % count].
// The span's quotient and remainder are taken once in 64 bits (div_mod); per element there are
// two 32-bit divisions by multiplication, exact in the ranges the span bounds (o < 2^14:
// numerators < 2^16).
constexpr int kScaleSpan = 1 << 14;
static_assert(kTileElems <= kScaleSpan, "a tile is one span");

// floor(x / d) for x < 2^16 and 1 <= d <= 2^15: c = ceil(2^31 / d) has c * d - 2^31 < d <= 2^(31 - 16).
struct MagicDivisor {
    uint32_t d, c;
    MagicDivisor() = default;
    __device__ __forceinline__ explicit MagicDivisor(uint32_t divisor)
        : d(divisor), c((0x80000000u + divisor - 1) / divisor) {}
    __device__ __forceinline__ uint32_t div(uint32_t x) const { return static_cast<uint32_t>((uint64_t(x) * c) >> 31); }
};

class ScaleSpan {
  public:
    ScaleSpan() = default;
    __device__ __forceinline__ ScaleSpan(const TensorEntry &entry, int64_t first) {
        const int64_t inner = max(entry.scale_inner, int64_t(1)), count = max(entry.scale_count, int64_t(1));
        const DivMod span = div_mod(static_cast<uint64_t>(first), static_cast<uint64_t>(inner));
        const int64_t r = static_cast<int64_t>(span.r);
        const int64_t f = static_cast<int64_t>(div_mod(span.q, static_cast<uint64_t>(count)).r);
        // Quotient step d = (r + o) / inner. An inner of kScaleSpan or more steps at most once in the
        // span: an inner of exactly kScaleSpan, started so that it steps at the same o, does the same.
        if (inner <= kScaleSpan) {
            inner_ = MagicDivisor(static_cast<uint32_t>(inner));
            start_ = static_cast<uint32_t>(r);
        } else {
            inner_ = MagicDivisor(kScaleSpan);
            start_ = static_cast<uint32_t>(kScaleSpan - min(inner - r, int64_t(kScaleSpan)));
        }
        // Feature f + d (d < kWrap) modulo count. Beyond kWrap features it wraps at most once: a
        // count of kWrap, started so that it wraps at the same d, does the same, and the wrapped
        // index y - kWrap is then the feature itself.
        scale_ = reinterpret_cast<const float *>(entry.scale);
        if (count <= kWrap) {
            count_ = MagicDivisor(static_cast<uint32_t>(count));
            y0_ = static_cast<uint32_t>(f);
            base_ = scale_;
        } else {
            count_ = MagicDivisor(kWrap);
            y0_ = static_cast<uint32_t>(kWrap - min(count - f, int64_t(kWrap)));
            base_ = scale_ + (f - y0_);
        }
    }

    // Factor of element first + o, 0 <= o < kScaleSpan.
    __device__ __forceinline__ float factor(int o) const {
        const uint32_t y = y0_ + inner_.div(start_ + static_cast<uint32_t>(o));
        const uint32_t q = count_.div(y);
        return __ldg((q != 0 ? scale_ : base_) + (y - q * count_.d));
    }

  private:
    static constexpr uint32_t kWrap = 1u << 15;
    MagicDivisor inner_, count_;
    uint32_t start_, y0_;
    const float *scale_; // feature y - q * count once wrapped (q > 0)
    const float *base_;  // minus y0 - f: feature f + d before the wrap, at y = y0 + d
};

// Element type D in 16-byte vectors: what the key readers below share.
template <int32_t D> struct VectorElements {
    using bits_t = typename DTypeTraits<D>::bits_t;
    static constexpr int kPerVec = 16 / int(sizeof(bits_t)); // elements per 16-byte vector

    // Element q of a 16-byte vector; q must be a compile-time constant after unrolling so that
    // `words` stays in registers. Little-endian: element 0 is in the low bits of x.
    __device__ __forceinline__ static bits_t element(const uint4 &v, int q) {
        const uint32_t words[4] = {v.x, v.y, v.z, v.w};
        if constexpr (sizeof(bits_t) == 4)
            return words[q];
        else
            return static_cast<bits_t>(words[q / 2] >> (16 * (q % 2)));
    }
};

// Key readers: one per branch of the dispatch. A reader is made per span of elements (a tile, or
// a small entry) with at(entry, first) and gives the key of the element at offset o of the span
// (o < kScaleSpan) from its bits. Unscaled: |w| in key space S, the offset unused.
template <int32_t D, int32_t S> struct KeyType : VectorElements<D> {
    using typename VectorElements<D>::bits_t;
    static constexpr bool kScaled = false;

    __device__ __forceinline__ static KeyType at(const TensorEntry &, int64_t) { return {}; }
    __device__ __forceinline__ uint32_t key(bits_t bits, int) const { return magnitude_key<D, S>(bits); }
    __device__ __forceinline__ uint32_t key(const uint4 &v, int q, int o) const { return key(this->element(v, q), o); }
};

// Scaled entry of dtype D: |w| times its factor, in the wide key space (keys.h: scaled_key).
template <int32_t D> struct ScaledKeyType : VectorElements<D> {
    using typename VectorElements<D>::bits_t;
    static constexpr bool kScaled = true;
    ScaleSpan span;

    __device__ __forceinline__ static ScaledKeyType at(const TensorEntry &entry, int64_t first) {
        ScaledKeyType reader;
        reader.span = ScaleSpan(entry, first);
        return reader;
    }
    __device__ __forceinline__ uint32_t key(bits_t bits, int o) const {
        return scaled_key(magnitude_key<D, kWide>(bits), span.factor(o));
    }
    __device__ __forceinline__ uint32_t key(const uint4 &v, int q, int o) const { return key(this->element(v, q), o); }
};

// Calls f(KT{}) with the entry's key reader type: ScaledKeyType for a scaled entry (wide keys
// whatever `space` asks), else KeyType<D, S> with kNative unless space == kWide (fp32 keys are the
// same in both). Unknown dtype codes call nothing, so a corrupt table row is skipped, not read.
template <typename F> __device__ __forceinline__ void visit_key_type(const TensorEntry &entry, int64_t space, F &&f) {
    const int64_t dtype = entry.dtype;
    if (entry.scale != 0) {
        if (dtype == kFloat32)
            f(ScaledKeyType<kFloat32>{});
        else if (dtype == kFloat16)
            f(ScaledKeyType<kFloat16>{});
        else if (dtype == kBFloat16)
            f(ScaledKeyType<kBFloat16>{});
    } else if (dtype == kFloat32) {
        f(KeyType<kFloat32, kNative>{});
    } else if (dtype == kFloat16) {
        if (space == kWide)
            f(KeyType<kFloat16, kWide>{});
        else
            f(KeyType<kFloat16, kNative>{});
    } else if (dtype == kBFloat16) {
        if (space == kWide)
            f(KeyType<kBFloat16, kWide>{});
        else
            f(KeyType<kBFloat16, kNative>{});
    }
}

// Whether a tile is read with 16-byte vectors, all of a lane's loads issued before the first use:
// full tiles of 16-byte aligned tensors, unscaled (a scaled key's factor lookup next to a lane's
// whole share of the tile in registers would spill).
template <typename KT> __device__ __forceinline__ bool vector_tile(uint64_t data, int count) {
    return !KT::kScaled && count == kTileElems && data % 16 == 0;
}

// Calls f(key, offset) for the `count` elements of the tile starting at element `first` of `entry`,
// one warp together (each lane gets its share, not in index order): vector_tile or element by element.
template <typename KT, typename F>
__device__ __forceinline__ void for_each_tile_key(const TensorEntry &entry, int64_t first, int count, int lane, F &&f) {
    const KT keys = KT::at(entry, first);
    const auto *bits = reinterpret_cast<const typename KT::bits_t *>(entry.data) + first;
    if (vector_tile<KT>(entry.data, count)) {
        constexpr int kVecs = int(kTileElems) / KT::kPerVec / 32; // vectors per lane
        const auto *vecs = reinterpret_cast<const uint4 *>(bits);
        uint4 v[kVecs];
#pragma unroll
        for (int j = 0; j < kVecs; ++j)
            v[j] = __ldg(vecs + j * 32 + lane);
#pragma unroll
        for (int j = 0; j < kVecs; ++j)
#pragma unroll
            for (int q = 0; q < KT::kPerVec; ++q) {
                const int offset = (j * 32 + lane) * KT::kPerVec + q;
                f(keys.key(v[j], q, offset), offset);
            }
    } else {
        // Not unrolled (partial, misaligned and scaled tiles): fewer registers, so fewer spills,
        // in the pass kernels that inline it, whose full tiles take the vector path above.
#pragma unroll 1
        for (int i = lane; i < count; i += 32)
            f(keys.key(bits[i], i), i);
    }
}

// Elements of `tile` that belong to `entry` (0 for a tile outside it or a null data pointer).
__device__ __forceinline__ int tile_count(const TensorEntry &entry, int64_t tile) {
    if (entry.data == 0 || tile < entry.tile_base)
        return 0;
    const int64_t left = entry.numel - (tile - entry.tile_base) * kTileElems;
    return static_cast<int>(max(int64_t(0), min(kTileElems, left)));
}

// Bytes of a tile's packed mask: 32 words of 64 bits, one per lane of the warp that builds it.
constexpr int kTileMaskBytes = int(kTileElems) / 8;

// Stores lane `lane`'s mask word of a tile of `count` elements from element `first`. Like the
// CPU, touches only the mask_bytes(numel) bytes: the last word of an entry may be partial.
__device__ __forceinline__ void store_tile_word(uint8_t *mask, int64_t first, int count, uint64_t word, int lane) {
    const int own = count - 64 * lane;
    if (own <= 0)
        return;
    uint8_t *dst = mask + first / 8 + 8 * lane;
    if (own >= 64 && reinterpret_cast<uintptr_t>(dst) % 8 == 0) {
        *reinterpret_cast<uint64_t *>(dst) = word;
    } else {
        for (int b = 0; b < min(8, ceil_div(own, 8)); ++b)
            dst[b] = static_cast<uint8_t>(word >> (8 * b));
    }
}

// Puts the keep-bits of vector `vec` of a full tile (PerVec elements of 16 bytes) into the warp's
// staging buffer, where lane l later finds mask word l; every lane calls it (with 4 elements per
// vector two neighbouring lanes' nibbles make one byte, the even lane's the low one).
template <int PerVec>
__device__ __forceinline__ void stage_vector_bits(uint8_t *staging, int vec, uint32_t bits, int lane) {
    if constexpr (PerVec == 8) {
        staging[vec] = static_cast<uint8_t>(bits);
    } else {
        const uint32_t high = __shfl_down_sync(kFullWarp, bits, 1);
        if (lane % 2 == 0)
            staging[vec / 2] = static_cast<uint8_t>(bits | (high << 4));
    }
}

// x with its elements whose bit in `bits` is 0 cleared (bit q: element q of the 16-byte vector).
template <int ElemBytes> __device__ __forceinline__ uint4 keep_elements(uint4 x, uint32_t bits) {
    uint32_t *lanes = reinterpret_cast<uint32_t *>(&x);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        if constexpr (ElemBytes == 4) {
            lanes[q] &= ((bits >> q) & 1u) ? 0xffffffffu : 0u;
        } else {
            const uint32_t lo = ((bits >> (2 * q)) & 1u) ? 0x0000ffffu : 0u;
            const uint32_t hi = ((bits >> (2 * q + 1)) & 1u) ? 0xffff0000u : 0u;
            lanes[q] &= lo | hi;
        }
    }
    return x;
}

// Stores `now` over `was` (the vector read from *dst) only where it differs: a build that zeroes
// what it prunes writes nothing in the steady state, whose pruned elements are zero already.
__device__ __forceinline__ void store_if_changed(uint4 *dst, const uint4 &was, const uint4 &now) {
    if (was.x != now.x || was.y != now.y || was.z != now.z || was.w != now.w)
        *dst = now;
}

// Zeroes the pruned elements of a full tile of 16-byte aligned data (one warp): lane l holds mask
// word l of the tile and each lane takes the bits of its vectors from the owning lane by shuffle.
// All of a lane's loads (only vectors that are partly kept need their data) are issued before
// the first store, so a warp has its whole share of the tile in flight at once.
template <int ElemBytes> __device__ void apply_tile_vector(uint4 *data, uint64_t my_word, int lane) {
    constexpr int kPerVec = 16 / ElemBytes;     // elements per 16-byte vector
    constexpr int kVecs = kTileElems / kPerVec; // vectors per tile
    constexpr int kVecsPerWord = 64 / kPerVec;  // vectors sharing one mask word
    constexpr int kLaneVecs = kVecs / 32;       // vectors per lane
    constexpr uint32_t kVecBits = (1u << kPerVec) - 1;
    uint32_t bits[kLaneVecs];
#pragma unroll
    for (int j = 0; j < kLaneVecs; ++j) {
        const int v = j * 32 + lane;
        const uint64_t word = __shfl_sync(0xffffffffu, my_word, v / kVecsPerWord);
        bits[j] = static_cast<uint32_t>(word >> ((v % kVecsPerWord) * kPerVec)) & kVecBits;
    }
    uint4 x[kLaneVecs] = {};
#pragma unroll
    for (int j = 0; j < kLaneVecs; ++j)
        if (bits[j] != kVecBits && bits[j] != 0)
            x[j] = data[j * 32 + lane];
#pragma unroll
    for (int j = 0; j < kLaneVecs; ++j) {
        if (bits[j] == kVecBits)
            continue; // all kept: no store
        data[j * 32 + lane] = bits[j] == 0 ? make_uint4(0, 0, 0, 0) : keep_elements<ElemBytes>(x[j], bits[j]);
    }
}

// Zeroes the pruned elements among `count` elements from `first`, one per lane and step.
template <typename Bits>
__device__ void apply_tile_scalar(Bits *data, const uint8_t *mask, int64_t first, int64_t count, int lane) {
    for (int64_t i = lane; i < count; i += 32)
        if (!mask_bit(mask, first + i))
            data[first + i] = Bits(0);
}

} // namespace gmp::cuda
