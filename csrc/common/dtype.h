// Dtype codes and magnitude-key spaces. Mirrored in gmp_ext/_backend.py (DTYPE_CODES, KeySpace).
#pragma once

#include "macros.h"

#include <cstdint>

namespace gmp {

enum DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A key space fixes how |w| maps to an unsigned integer key whose order is the order of |w|.
//   kNative: the dtype's own bits without the sign: 31-bit keys for fp32, 15-bit for fp16/bf16.
//   kWide:   31-bit fp32-like keys for every dtype (bf16 << 16; fp16 converted exactly), so
//            tensors of different dtypes can share one global histogram.
enum KeySpace : int32_t { kNative = 0, kWide = 1 };

GMP_HOST_DEVICE constexpr bool is_valid_dtype(int32_t code) { return code >= kFloat32 && code <= kBFloat16; }

GMP_HOST_DEVICE constexpr int64_t dtype_size(int32_t code) { return code == kFloat32 ? 4 : 2; }

// Number of bits in a key: keys are < 2^key_bits.
GMP_HOST_DEVICE constexpr int key_bits(int32_t dtype, int32_t space) {
    return (space == kWide || dtype == kFloat32) ? 31 : 15;
}
} // namespace gmp
