// The one definition of the magnitude key, shared by the CPU and CUDA kernels.
//
// For IEEE floats with the sign bit cleared, the unsigned bit pattern orders exactly like |w|:
// +0 and -0 both map to key 0, +-inf to the infinity key, and every NaN to a key above it,
// which is how the kernels detect NaN weights without a separate pass.
#pragma once

#include "dtype.h"
#include "macros.h"
#include "tensor_table.h"

#include <cstdint>
#include <cstring>

namespace gmp {

constexpr uint32_t kInfKeyF32 = 0x7f800000u;
constexpr uint32_t kInfKeyF16 = 0x7c00u;
constexpr uint32_t kInfKeyBF16 = 0x7f80u;

// Exact |fp16| -> fp32 bit pattern with integer arithmetic only (no cuda_fp16.h on the host).
GMP_HOST_DEVICE uint32_t f16_magnitude_to_f32_bits(uint16_t bits) {
    uint32_t exponent = (bits >> 10) & 0x1fu;
    uint32_t mantissa = bits & 0x3ffu;
    if (exponent == 0x1fu)
        return kInfKeyF32 | (mantissa << 13);
    if (exponent != 0)
        return ((exponent + 112u) << 23) | (mantissa << 13);
    if (mantissa == 0)
        return 0;
    // Subnormal fp16 (mantissa * 2^-24) is a normal fp32: shift the leading one into bit 10.
    uint32_t e = 113;
    while (!(mantissa & 0x400u)) {
        mantissa <<= 1;
        --e;
    }
    return (e << 23) | ((mantissa & 0x3ffu) << 13);
}

template <int32_t D> struct DTypeTraits;
template <> struct DTypeTraits<kFloat32> {
    using bits_t = uint32_t;
};
template <> struct DTypeTraits<kFloat16> {
    using bits_t = uint16_t;
};
template <> struct DTypeTraits<kBFloat16> {
    using bits_t = uint16_t;
};

template <int32_t D, int32_t S> GMP_HOST_DEVICE uint32_t magnitude_key(typename DTypeTraits<D>::bits_t bits) {
    if constexpr (D == kFloat32) {
        return bits & 0x7fffffffu;
    } else if constexpr (S == kNative) {
        return bits & 0x7fffu;
    } else if constexpr (D == kBFloat16) {
        return static_cast<uint32_t>(bits & 0x7fffu) << 16;
    } else {
        return f16_magnitude_to_f32_bits(static_cast<uint16_t>(bits & 0x7fffu));
    }
}

GMP_HOST_DEVICE constexpr uint32_t inf_key(int32_t dtype, int32_t space) {
    if (space == kWide || dtype == kFloat32)
        return kInfKeyF32;
    return dtype == kFloat16 ? kInfKeyF16 : kInfKeyBF16;
}

GMP_HOST_DEVICE uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    return bits;
#endif
}

GMP_HOST_DEVICE float f32_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(bits);
#else
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
#endif
}

// Key of a scaled entry's element (TensorEntry::scale): the fp32 bit pattern of |w| * factor, one
// IEEE multiply (round to nearest, no FMA: the reference's `w.abs().float() * factor`) of |w|'s
// exact fp32 value `magnitude` (magnitude_key<D, kWide>). Factors are >= 0, so the product is too,
// or NaN (a NaN weight, an infinite one against a zero factor, a zero one against an infinite
// factor): a key above the infinity key, whatever sign bit the hardware gave the NaN. Scaled keys
// are in the wide space for every dtype.
GMP_HOST_DEVICE uint32_t scaled_key(uint32_t magnitude, float factor) {
#if defined(__CUDA_ARCH__)
    return f32_bits(__fmul_rn(f32_from_bits(magnitude), factor)) & 0x7fffffffu;
#else
    return f32_bits(f32_from_bits(magnitude) * factor) & 0x7fffffffu;
#endif
}

// Which factor of a scaled entry element i takes.
GMP_HOST_DEVICE int64_t scale_feature(const TensorEntry &entry, int64_t i) {
    return (i / entry.scale_inner) % entry.scale_count;
}

// The key space an entry's keys are in when `requested` is asked for: scaled keys are always wide.
GMP_HOST_DEVICE int32_t entry_key_space(const TensorEntry &entry, int32_t requested) {
    return entry.scale != 0 ? kWide : requested;
}

// The selection prunes the k smallest (key, index) pairs; (T, I) is the k-th of them.
// Index I == -1 with T == 0 means nothing is pruned (k == 0).
GMP_HOST_DEVICE bool is_kept(uint32_t key, int64_t index, uint32_t threshold_key, int64_t threshold_index) {
    return key > threshold_key || (key == threshold_key && index > threshold_index);
}

} // namespace gmp
