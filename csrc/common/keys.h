// The one definition of the magnitude key, shared by the CPU and CUDA kernels.
//
// For IEEE floats with the sign bit cleared, the unsigned bit pattern orders exactly like |w|:
// +0 and -0 both map to key 0, +-inf to the infinity key, and every NaN to a key above it,
// which is how the kernels detect NaN weights without a separate pass.
#pragma once

#include "dtype.h"
#include "macros.h"

#include <cstdint>

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

// The selection prunes the k smallest (key, index) pairs; (T, I) is the k-th of them.
// Index I == -1 with T == 0 means nothing is pruned (k == 0).
GMP_HOST_DEVICE bool is_kept(uint32_t key, int64_t index, uint32_t threshold_key, int64_t threshold_index) {
    return key > threshold_key || (key == threshold_key && index > threshold_index);
}

} // namespace gmp
