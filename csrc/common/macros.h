// Portability macros shared by host (C++) and device (CUDA) code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GMP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define GMP_HOST_DEVICE inline
#endif

namespace gmp {

template <typename T> GMP_HOST_DEVICE constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

} // namespace gmp
