// The one definition of N:M groups and candidates, shared by the CPU and CUDA kernels.
//
// A group is M consecutive elements (flat indices g * M to g * M + M - 1; Python checks that rows
// of weight.reshape(shape[0], -1) are whole groups, so a group never crosses a row). Within a
// group the elements rank by (key, index); the M - n lowest are its candidates, the only elements
// an N:M selection may prune, and the n highest are protected, so no group loses more than M - n.
// Candidate j (in index order) of group g sits at position g * (M - n) + j of the candidate list:
// (key, flat index) order over candidates equals (key, position) order over the list, so the k-th
// smallest of the list (the layerwise or global selection kernels) is the N:M selection.
// M is a power of two up to 32, so groups tile the kernels' 64-element mask words exactly.
#pragma once

#include "macros.h"

#include <cstdint>

namespace gmp {

constexpr int kMaxGroup = 32;

GMP_HOST_DEVICE constexpr bool valid_group(int64_t n, int64_t m) {
    return m >= 2 && m <= kMaxGroup && (m & (m - 1)) == 0 && n >= 1 && n < m;
}

// Bit i set: element i of the group (keys[0..M)) is a candidate, i.e. fewer than M - n elements
// precede it in (key, index) order. NaN keys rank above every number, so they are protected first.
template <int M> GMP_HOST_DEVICE uint32_t candidate_bits(const uint32_t (&keys)[M], int n) {
    // rank[i] = elements before i in (key, index) order, from each pair once: for i < j, j comes
    // first exactly when keys[j] < keys[i]. Branch-free, since which elements win is data.
    int rank[M] = {};
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = 0; i < M; ++i)
#if defined(__CUDACC__)
#pragma unroll
#endif
        for (int j = i + 1; j < M; ++j) {
            const int j_first = int(keys[j] < keys[i]);
            rank[i] += j_first;
            rank[j] += 1 - j_first;
        }
    uint32_t bits = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = 0; i < M; ++i)
        bits |= uint32_t(rank[i] < M - n) << i;
    return bits;
}

// Calls f(std::integral_constant-like tag) with the group size as a compile-time constant.
template <int M> struct GroupSize {
    static constexpr int value = M;
};

template <typename F> GMP_HOST_DEVICE void visit_group_size(int64_t m, F &&f) {
    switch (m) {
    case 2:
        f(GroupSize<2>{});
        return;
    case 4:
        f(GroupSize<4>{});
        return;
    case 8:
        f(GroupSize<8>{});
        return;
    case 16:
        f(GroupSize<16>{});
        return;
    case 32:
        f(GroupSize<32>{});
        return;
    default:
        return;
    }
}

} // namespace gmp
