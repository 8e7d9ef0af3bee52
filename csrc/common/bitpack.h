// The one definition of the packed-mask layout, shared by the CPU and CUDA kernels.
//
// Bit i of a tensor's mask (flat index in tensor.flatten() order) is bit (i % 8) of byte i / 8,
// bit = 1 means kept. This is numpy.packbits(..., bitorder="little"), and on little-endian
// machines also bit (i % 64) of 64-bit word i / 64, which is how the kernels read it.
#pragma once

#include "macros.h"

#include <cstdint>

namespace gmp {

// Mask buffers allocated by gmp_ext are padded to this many bytes so that vector loads of the
// last word stay in bounds; the kernels themselves only touch the first mask_bytes(numel).
constexpr int64_t kMaskAlignBytes = 16;

GMP_HOST_DEVICE constexpr int64_t mask_bytes(int64_t numel) { return ceil_div<int64_t>(numel, 8); }

GMP_HOST_DEVICE constexpr int64_t mask_storage_bytes(int64_t numel) {
    return ceil_div<int64_t>(mask_bytes(numel), kMaskAlignBytes) * kMaskAlignBytes;
}

GMP_HOST_DEVICE bool mask_bit(const uint8_t *mask, int64_t i) { return (mask[i >> 3] >> (i & 7)) & 1u; }

} // namespace gmp
