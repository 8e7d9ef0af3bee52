// Keys of scaled entries (TensorEntry::scale, keys.h: scaled_key): |w| times a per-feature factor,
// computed a range at a time so that the selection's and the build's loops then read them like
// fp32 keys (vector compares included) and the feature index costs no division per element.
#include "cpu_common.h"

#include <algorithm>

namespace gmp::cpu {
namespace {

// out[t] = key of bits[t] times factors[t], t < count: a loop the compiler vectorises, with AVX2
// where the CPU has it (8 lanes: the key computation then costs about what reading it does).
template <int32_t D, typename Bits>
inline void scale_run(const Bits *bits, const float *factors, int64_t count, uint32_t *out) {
    for (int64_t t = 0; t < count; ++t)
        out[t] = scaled_key(magnitude_key<D, kWide>(bits[t]), factors[t]);
}

#ifdef GMP_HAVE_AVX2_DISPATCH
template <int32_t D, typename Bits>
__attribute__((target("avx2"))) void scale_run_avx2(const Bits *bits, const float *factors, int64_t count,
                                                    uint32_t *out) {
    scale_run<D>(bits, factors, count, out);
}
#endif

template <int32_t D, typename Bits>
void scale_row(const Bits *bits, const float *factors, int64_t count, uint32_t *out) {
#ifdef GMP_HAVE_AVX2_DISPATCH
    if (have_avx2()) {
        scale_run_avx2<D>(bits, factors, count, out);
        return;
    }
#endif
    scale_run<D>(bits, factors, count, out);
}

// out[t] = key of element begin + t. The factors repeat with a period of inner * count elements
// (a row of the weight): inner == 1 (a Linear's rows) walks the factors themselves along the
// elements; a short period (a conv's channels x taps) is spelled out once per call, so the keys
// are one vectorised loop per period rather than one short loop per run of `inner` elements; a
// longer one goes run by run (long runs: transposed layouts).
template <int32_t D> void scaled_range(const TensorEntry &entry, int64_t begin, int64_t end, uint32_t *out) {
    const auto *bits = reinterpret_cast<const typename DTypeTraits<D>::bits_t *>(entry.data);
    const auto *factors = reinterpret_cast<const float *>(entry.scale);
    const int64_t inner = entry.scale_inner, count = entry.scale_count;
    const int64_t period = inner * count;
    if (inner > 1 && period > 2 * (end - begin)) {
        int64_t feature = scale_feature(entry, begin);
        for (int64_t i = begin; i < end;) {
            const int64_t run = std::min(inner - i % inner, end - i);
            const float factor = factors[feature];
            for (int64_t t = 0; t < run; ++t)
                out[i - begin + t] = scaled_key(magnitude_key<D, kWide>(bits[i + t]), factor);
            i += run;
            feature = feature + 1 == count ? 0 : feature + 1;
        }
        return;
    }
    const float *repeated = row_factors(entry);
    for (int64_t i = begin, at = begin % period; i < end; at = 0) {
        const int64_t run = std::min(period - at, end - i);
        scale_row<D>(bits + i, repeated + at, run, out + (i - begin));
        i += run;
    }
}

} // namespace

void scaled_keys(const TensorEntry &entry, int64_t begin, int64_t end, uint32_t *out) {
    switch (entry.dtype) {
    case kFloat32:
        scaled_range<kFloat32>(entry, begin, end, out);
        return;
    case kFloat16:
        scaled_range<kFloat16>(entry, begin, end, out);
        return;
    case kBFloat16:
        scaled_range<kBFloat16>(entry, begin, end, out);
        return;
    default:
        throw std::invalid_argument(detail::concat("gmp_ext._C: unknown dtype code ", entry.dtype));
    }
}

} // namespace gmp::cpu
