// Python bindings of gmp_ext._C: one m.def per entry point of ops.h. Arguments are integers
// (addresses, counts, codes, thread count, stream); the GIL is released while kernels run.
// Input validation with readable messages lives in gmp_ext/ops.py.
#include "common/bitpack.h"
#include "common/dtype.h"
#include "common/tensor_table.h"
#include "ops.h"

#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;
using gmp::Selection;
using gmp::TensorEntry;

namespace {

template <typename T> T *ptr(uintptr_t address) { return reinterpret_cast<T *>(address); }

py::dict build_info() {
    py::dict info;
    info["version"] = GMP_EXT_VERSION;
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
#ifdef GMP_EXT_WITH_CUDA
    info["cuda"] = true;
    info["cuda_architectures"] = GMP_EXT_CUDA_ARCHS;
    info["cuda_compiler_version"] = GMP_EXT_CUDA_VERSION;
    info["cuda_tile_elems"] = gmp::cuda::kTileElems;
#else
    info["cuda"] = false;
    info["cuda_architectures"] = "";
    info["cuda_compiler_version"] = "";
    info["cuda_tile_elems"] = 0;
#endif
    // The layout Python mirrors in gmp_ext/_layout.py (checked at import).
    info["mask_align_bytes"] = gmp::kMaskAlignBytes;
    info["table_columns"] = static_cast<int64_t>(sizeof(TensorEntry) / sizeof(int64_t));
    info["selection_columns"] = static_cast<int64_t>(sizeof(Selection) / sizeof(int64_t));
    py::dict dtype_codes;
    dtype_codes["float32"] = static_cast<int>(gmp::kFloat32);
    dtype_codes["float16"] = static_cast<int>(gmp::kFloat16);
    dtype_codes["bfloat16"] = static_cast<int>(gmp::kBFloat16);
    info["dtype_codes"] = dtype_codes;
    py::dict key_spaces;
    key_spaces["native"] = static_cast<int>(gmp::kNative);
    key_spaces["wide"] = static_cast<int>(gmp::kWide);
    info["key_spaces"] = key_spaces;
    return info;
}

} // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "gmp_ext native kernels (raw-pointer interface; use gmp_ext.ops)";
    const auto nogil = py::call_guard<py::gil_scoped_release>();

    m.def("build_info", &build_info, "Compile-time configuration of this build.");
    m.def("cpu_max_threads", &gmp::cpu::max_threads, "omp_get_max_threads() of the loaded OpenMP runtime.");

    m.def(
        "cpu_select_layerwise",
        [](uintptr_t table, int64_t n, uintptr_t k, uintptr_t out, int threads) {
            gmp::cpu::select_layerwise(ptr<const TensorEntry>(table), n, ptr<const int64_t>(k), ptr<Selection>(out),
                                       threads);
        },
        py::arg("table"), py::arg("n"), py::arg("k"), py::arg("out"), py::arg("threads"), nogil,
        "Per-entry k-th smallest (|w|, index) selection.");
    m.def(
        "cpu_select_global",
        [](uintptr_t table, int64_t n, int64_t k, int32_t key_space, uintptr_t out, int threads) {
            gmp::cpu::select_global(ptr<const TensorEntry>(table), n, k, key_space, ptr<Selection>(out), threads);
        },
        py::arg("table"), py::arg("n"), py::arg("k"), py::arg("key_space"), py::arg("out"), py::arg("threads"), nogil,
        "One selection over all entries in (|w|, entry, index) order.");
    m.def(
        "cpu_prune_layerwise",
        [](uintptr_t table, int64_t n, uintptr_t k, uintptr_t out, int threads) {
            gmp::cpu::prune_layerwise(ptr<const TensorEntry>(table), n, ptr<const int64_t>(k), ptr<Selection>(out),
                                      threads);
        },
        py::arg("table"), py::arg("n"), py::arg("k"), py::arg("out"), py::arg("threads"), nogil,
        "Per-entry selection, mask build and zeroing of the pruned elements.");
    m.def(
        "cpu_prune_global",
        [](uintptr_t table, int64_t n, int64_t k, int32_t key_space, uintptr_t out, int threads) {
            gmp::cpu::prune_global(ptr<const TensorEntry>(table), n, k, key_space, ptr<Selection>(out), threads);
        },
        py::arg("table"), py::arg("n"), py::arg("k"), py::arg("key_space"), py::arg("out"), py::arg("threads"), nogil,
        "One selection over all entries, mask build and zeroing of the pruned elements.");
    m.def(
        "cpu_build_masks",
        [](uintptr_t table, int64_t n, uintptr_t selection, int threads, bool zero_pruned, uintptr_t kept) {
            gmp::cpu::build_masks(ptr<const TensorEntry>(table), n, ptr<const Selection>(selection), threads,
                                  zero_pruned, ptr<int64_t>(kept));
        },
        py::arg("table"), py::arg("n"), py::arg("selection"), py::arg("threads"), py::arg("zero_pruned") = false,
        py::arg("kept") = 0, nogil,
        "Write packed keep-masks from selection rows (and zero the pruned elements; count the kept ones).");
    m.def(
        "cpu_histogram",
        [](uintptr_t table, int64_t n, int32_t key_space, int32_t shift, int64_t bins, int32_t prefix_shift,
           uintptr_t prefixes, uintptr_t out, uintptr_t nan_counts, int threads) {
            gmp::cpu::histogram(ptr<const TensorEntry>(table), n, key_space, shift, bins, prefix_shift,
                                ptr<const int64_t>(prefixes), ptr<int64_t>(out), ptr<int64_t>(nan_counts), threads);
        },
        py::arg("table"), py::arg("n"), py::arg("key_space"), py::arg("shift"), py::arg("bins"),
        py::arg("prefix_shift"), py::arg("prefixes"), py::arg("out"), py::arg("nan_counts"), py::arg("threads"), nogil,
        "Per-entry digit histograms of the keys, optionally within a key prefix, and NaN counts.");
    m.def(
        "cpu_find_equal",
        [](uintptr_t table, int64_t n, int32_t key_space, uintptr_t keys, uintptr_t ranks, uintptr_t out, int threads) {
            gmp::cpu::find_equal(ptr<const TensorEntry>(table), n, key_space, ptr<const int64_t>(keys),
                                 ptr<const int64_t>(ranks), ptr<int64_t>(out), threads);
        },
        py::arg("table"), py::arg("n"), py::arg("key_space"), py::arg("keys"), py::arg("ranks"), py::arg("out"),
        py::arg("threads"), nogil, "Per entry, the flat index of the rank-th element equal to a key.");
    m.def(
        "cpu_apply_masks",
        [](uintptr_t table, int64_t n, int threads) {
            gmp::cpu::apply_masks(ptr<const TensorEntry>(table), n, threads);
        },
        py::arg("table"), py::arg("n"), py::arg("threads"), nogil, "Zero pruned elements of all entries.");
    m.def(
        "cpu_nm_gather",
        [](uintptr_t table, int64_t entries, int32_t n, int32_t group, uintptr_t lists, int threads) {
            gmp::cpu::nm_gather(ptr<const TensorEntry>(table), entries, n, group, ptr<const TensorEntry>(lists),
                                threads);
        },
        py::arg("table"), py::arg("entries"), py::arg("n"), py::arg("m"), py::arg("lists"), py::arg("threads"), nogil,
        "Write every entry's N:M candidate list into the lists' table.");
    m.def(
        "cpu_nm_build_masks",
        [](uintptr_t table, int64_t entries, int32_t n, int32_t group, uintptr_t selection, int threads) {
            gmp::cpu::nm_build_masks(ptr<const TensorEntry>(table), entries, n, group, ptr<const Selection>(selection),
                                     threads);
        },
        py::arg("table"), py::arg("entries"), py::arg("n"), py::arg("m"), py::arg("selection"), py::arg("threads"),
        nogil, "Write N:M keep-masks from selection rows over the candidate lists.");
    m.def(
        "cpu_count_kept",
        [](uintptr_t table, int64_t n, uintptr_t out, int threads) {
            gmp::cpu::count_kept(ptr<const TensorEntry>(table), n, ptr<int64_t>(out), threads);
        },
        py::arg("table"), py::arg("n"), py::arg("out"), py::arg("threads"), nogil,
        "Per entry, the set bits among its mask's first numel bits.");
    m.def(
        "cpu_pack_bits",
        [](uintptr_t bools, int64_t numel, uintptr_t packed, int threads) {
            gmp::cpu::pack_bits(ptr<const uint8_t>(bools), numel, ptr<uint8_t>(packed), threads);
        },
        py::arg("bools"), py::arg("numel"), py::arg("packed"), py::arg("threads"), nogil, "bool bytes -> bits.");
    m.def(
        "cpu_unpack_bits",
        [](uintptr_t packed, int64_t numel, uintptr_t bools, int threads) {
            gmp::cpu::unpack_bits(ptr<const uint8_t>(packed), numel, ptr<uint8_t>(bools), threads);
        },
        py::arg("packed"), py::arg("numel"), py::arg("bools"), py::arg("threads"), nogil, "bits -> bool bytes.");

#ifdef GMP_EXT_WITH_CUDA
    m.def("cuda_device_count", &gmp::cuda::device_count, "Visible CUDA devices, -1 without a usable driver.");
    m.def("cuda_driver_status", &gmp::cuda::driver_status, "'ok' or the CUDA runtime's error string.");
    m.def(
        "cuda_apply_masks",
        [](uintptr_t table, int64_t n, int64_t total_tiles, uintptr_t stream) {
            gmp::cuda::apply_masks(ptr<const TensorEntry>(table), n, total_tiles, stream);
        },
        py::arg("table"), py::arg("n"), py::arg("total_tiles"), py::arg("stream"), nogil,
        "Zero pruned elements of all entries of a device-resident table in one launch.");
    m.def("cuda_select_scratch_bytes", &gmp::cuda::select_scratch_bytes, py::arg("n"), py::arg("total_numel"),
          py::arg("mode"), nogil, "Scratch bytes of a CUDA selection, mode 0 = layerwise, 1 = global.");
    m.def(
        "cuda_select_layerwise",
        [](uintptr_t table, int64_t n, uintptr_t k, uintptr_t out, uintptr_t scratch, int64_t scratch_bytes,
           int64_t total_tiles, uintptr_t stream) {
            gmp::cuda::select_layerwise(ptr<const TensorEntry>(table), n, ptr<const int64_t>(k), ptr<Selection>(out),
                                        ptr<void>(scratch), scratch_bytes, total_tiles, stream);
        },
        py::arg("table"), py::arg("n"), py::arg("k"), py::arg("out"), py::arg("scratch"), py::arg("scratch_bytes"),
        py::arg("total_tiles"), py::arg("stream"), nogil,
        "Per-entry k-th smallest (|w|, index) selection of a device-resident table.");
    m.def(
        "cuda_select_global",
        [](uintptr_t table, int64_t n, uintptr_t k, int32_t key_space, uintptr_t out, uintptr_t scratch,
           int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream) {
            gmp::cuda::select_global(ptr<const TensorEntry>(table), n, ptr<const int64_t>(k), key_space,
                                     ptr<Selection>(out), ptr<void>(scratch), scratch_bytes, total_tiles, stream);
        },
        py::arg("table"), py::arg("n"), py::arg("k"), py::arg("key_space"), py::arg("out"), py::arg("scratch"),
        py::arg("scratch_bytes"), py::arg("total_tiles"), py::arg("stream"), nogil,
        "One selection over all entries of a device-resident table in (|w|, entry, index) order.");
    m.def(
        "cuda_prune_layerwise",
        [](uintptr_t table, int64_t n, uintptr_t k, uintptr_t out, uintptr_t scratch, int64_t scratch_bytes,
           int64_t total_tiles, uintptr_t stream) {
            gmp::cuda::prune_layerwise(ptr<const TensorEntry>(table), n, ptr<const int64_t>(k), ptr<Selection>(out),
                                       ptr<void>(scratch), scratch_bytes, total_tiles, stream);
        },
        py::arg("table"), py::arg("n"), py::arg("k"), py::arg("out"), py::arg("scratch"), py::arg("scratch_bytes"),
        py::arg("total_tiles"), py::arg("stream"), nogil,
        "Per-entry selection, mask build and zeroing of the pruned elements of a device-resident table.");
    m.def(
        "cuda_prune_global",
        [](uintptr_t table, int64_t n, uintptr_t k, int32_t key_space, uintptr_t out, uintptr_t scratch,
           int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream) {
            gmp::cuda::prune_global(ptr<const TensorEntry>(table), n, ptr<const int64_t>(k), key_space,
                                    ptr<Selection>(out), ptr<void>(scratch), scratch_bytes, total_tiles, stream);
        },
        py::arg("table"), py::arg("n"), py::arg("k"), py::arg("key_space"), py::arg("out"), py::arg("scratch"),
        py::arg("scratch_bytes"), py::arg("total_tiles"), py::arg("stream"), nogil,
        "One selection over all entries of a device-resident table, mask build and zeroing of the pruned elements.");
    m.def(
        "cuda_build_masks",
        [](uintptr_t table, int64_t n, uintptr_t selection, int64_t total_tiles, uintptr_t stream, bool zero_pruned,
           uintptr_t kept) {
            gmp::cuda::build_masks(ptr<const TensorEntry>(table), n, ptr<const Selection>(selection), total_tiles,
                                   stream, zero_pruned, ptr<int64_t>(kept));
        },
        py::arg("table"), py::arg("n"), py::arg("selection"), py::arg("total_tiles"), py::arg("stream"),
        py::arg("zero_pruned") = false, py::arg("kept") = 0, nogil,
        "Write packed keep-masks of a device-resident table from selection rows in one launch (and zero the "
        "pruned elements; count the kept ones).");
    m.def(
        "cuda_count_kept",
        [](uintptr_t table, int64_t n, uintptr_t kept, int64_t total_tiles, uintptr_t stream) {
            gmp::cuda::count_kept(ptr<const TensorEntry>(table), n, ptr<int64_t>(kept), total_tiles, stream);
        },
        py::arg("table"), py::arg("n"), py::arg("kept"), py::arg("total_tiles"), py::arg("stream"), nogil,
        "Per entry of a device-resident table, the set bits among its mask's first numel bits, in one launch.");
    m.def(
        "cuda_nm_gather",
        [](uintptr_t table, int64_t entries, int32_t n, int32_t group, uintptr_t lists, int64_t total_tiles,
           uintptr_t stream) {
            gmp::cuda::nm_gather(ptr<const TensorEntry>(table), entries, n, group, ptr<const TensorEntry>(lists),
                                 total_tiles, stream);
        },
        py::arg("table"), py::arg("entries"), py::arg("n"), py::arg("m"), py::arg("lists"), py::arg("total_tiles"),
        py::arg("stream"), nogil, "Write every entry's N:M candidate list (device-resident table) in one launch.");
    m.def(
        "cuda_nm_build_masks",
        [](uintptr_t table, int64_t entries, int32_t n, int32_t group, uintptr_t selection, int64_t total_tiles,
           uintptr_t stream) {
            gmp::cuda::nm_build_masks(ptr<const TensorEntry>(table), entries, n, group, ptr<const Selection>(selection),
                                      total_tiles, stream);
        },
        py::arg("table"), py::arg("entries"), py::arg("n"), py::arg("m"), py::arg("selection"), py::arg("total_tiles"),
        py::arg("stream"), nogil, "Write N:M keep-masks from selection rows over the candidate lists in one launch.");
#endif
}
