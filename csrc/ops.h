// Host entry points of the compiled module. Every argument is a plain integer: addresses of
// tensors owned by torch, element counts, dtype and key-space codes, a thread count and, for
// CUDA, the stream handle. Nothing here knows about torch.
#pragma once

#include "common/tensor_table.h"

#include <cstdint>

namespace gmp::cpu {

// Per-entry selection: row i of `out` prunes k[i] elements of entry i (native key space; wide for
// a scaled entry, whose keys are float32 products: TensorEntry::scale).
void select_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, int num_threads);

// One selection over the concatenation of all entries (never materialised): the k smallest
// (key, elem_base + flat index) pairs are pruned. Writes one row per entry. Scaled entries of
// 16-bit weights need the wide key space.
void select_global(const TensorEntry *table, int64_t n, int64_t k, int32_t key_space, Selection *out, int num_threads);

// Writes the packed keep-mask of every entry from its selection row; a row with NaNs (nan_count > 0)
// leaves its mask as it was, so a selection void for NaN weights never corrupts masks. With
// zero_pruned, also zeroes every element whose bit is then 0 (build and apply_masks in one call,
// each tile applied right after its build, while it is in cache). `kept`, when not null, receives
// each entry's count_kept of the masks as the build leaves them (each tile counted in cache).
void build_masks(const TensorEntry *table, int64_t n, const Selection *selection, int num_threads,
                 bool zero_pruned = false, int64_t *kept = nullptr);

// A prune step: the selection above, then build_masks(..., zero_pruned = true), with the same
// rows, masks and weights as those two calls. When the first radix pass leaves a bucket whose
// elements fit the candidate buffer, the build is the second and last read of the weights: it
// settles every element outside the bucket and gathers the bucket's, whose rank then gives the
// threshold (a NaN row: masks left as they were, weights zeroed by them, as build_masks does).
void prune_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, int num_threads);
void prune_global(const TensorEntry *table, int64_t n, int64_t k, int32_t key_space, Selection *out, int num_threads);

// Radix-select passes driven from outside (csrc/cpu/histogram.cpp), for selections whose counts
// are summed across processes. out[e * bins + d] = number of elements of entry e whose digit
// (key >> shift) & (bins - 1) is d, among those with key >> prefix_shift == prefixes[e] when
// `prefixes` is not null (entries with a negative prefix are skipped). When `nan_counts` is not
// null it receives each entry's NaN count (keys above the infinity key; skipped entries: 0).
void histogram(const TensorEntry *table, int64_t n, int32_t key_space, int32_t shift, int64_t bins,
               int32_t prefix_shift, const int64_t *prefixes, int64_t *out, int64_t *nan_counts, int num_threads);

// out[e] = flat index of the ranks[e]-th (1-based, in index order) element of entry e whose key
// is keys[e], or -1 when ranks[e] <= 0. A rank beyond the number of such elements throws.
void find_equal(const TensorEntry *table, int64_t n, int32_t key_space, const int64_t *keys, const int64_t *ranks,
                int64_t *out, int num_threads);

// Zeroes every element whose mask bit is 0, for all entries at once.
void apply_masks(const TensorEntry *table, int64_t n, int num_threads);

// N:M selection (common/nm.h). nm_gather writes entry e's candidate list, numel / m * (m - n)
// elements of its dtype (a scaled entry: its float32 keys), into lists[e].data (a table of the lists; a group holding
// NaN lists a NaN first, so selection over the lists reports it). nm_build_masks writes packed keep-masks from
// selection rows over those lists (index = position in the list): protected elements and the candidates above the cut
// are kept; a row with NaNs leaves its mask as it was. Every numel must be a multiple of m.
void nm_gather(const TensorEntry *table, int64_t entries, int32_t n, int32_t m, const TensorEntry *lists,
               int num_threads);
void nm_build_masks(const TensorEntry *table, int64_t entries, int32_t n, int32_t m, const Selection *selection,
                    int num_threads);

// out[e] = set bits among the first numel bits of entry e's mask: the elements it keeps.
void count_kept(const TensorEntry *table, int64_t n, int64_t *out, int num_threads);

// bool bytes (0/1) <-> packed bits, numel elements.
void pack_bits(const uint8_t *bools, int64_t numel, uint8_t *packed, int num_threads);
void unpack_bits(const uint8_t *packed, int64_t numel, uint8_t *bools, int num_threads);

int max_threads();

} // namespace gmp::cpu

#ifdef GMP_EXT_WITH_CUDA
namespace gmp::cuda {

// Number of visible devices, or -1 when the driver is missing or too old (import must work).
int device_count();
const char *driver_status();

// Elements per tile of the CUDA kernels' flat grids (TensorEntry::tile_base counts these).
constexpr int64_t kTileElems = 2048;

// Same contract as gmp::cpu::apply_masks with `table` in device memory, masks padded to
// kMaskAlignBytes, one launch on `stream`. total_tiles = sum of ceil(numel / kTileElems).
void apply_masks(const TensorEntry *table, int64_t n, int64_t total_tiles, uintptr_t stream);

// Bytes of device scratch that select_layerwise (mode 0) or select_global (mode 1) needs for n
// entries of total_numel elements in all: per-entry state and flags, histograms, candidate slots.
int64_t select_scratch_bytes(int64_t n, int64_t total_numel, int32_t mode);

// Same contracts as the gmp::cpu selections with `table`, `k` (layerwise: one per entry; global: one
// count, clamped to [0, total elements]), `out` and `scratch` in device memory: a fixed sequence of
// launches on `stream`, no host synchronisation. k is read on the device, so a captured CUDA graph
// replays with whatever counts were last written there.
void select_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, void *scratch,
                      int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream);
void select_global(const TensorEntry *table, int64_t n, const int64_t *k, int32_t key_space, Selection *out,
                   void *scratch, int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream);

// Same contracts as gmp::cpu::prune_layerwise / prune_global, with the arguments of the selections
// above (the table's masks in device memory): a fixed sequence of launches, no host synchronisation.
void prune_layerwise(const TensorEntry *table, int64_t n, const int64_t *k, Selection *out, void *scratch,
                     int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream);
void prune_global(const TensorEntry *table, int64_t n, const int64_t *k, int32_t key_space, Selection *out,
                  void *scratch, int64_t scratch_bytes, int64_t total_tiles, uintptr_t stream);

// Same contract as gmp::cpu::build_masks with `table`, `selection` and `kept` in device memory, one
// launch (with zero_pruned, the pruned elements are zeroed from the registers the build read them
// into; `kept` is zeroed on the stream first, then each warp adds its tile's count).
void build_masks(const TensorEntry *table, int64_t n, const Selection *selection, int64_t total_tiles, uintptr_t stream,
                 bool zero_pruned = false, int64_t *kept = nullptr);

// Same contract as gmp::cpu::count_kept with `table` and `kept` in device memory, one launch (`kept`
// zeroed on the stream first).
void count_kept(const TensorEntry *table, int64_t n, int64_t *kept, int64_t total_tiles, uintptr_t stream);

// Same contracts as gmp::cpu::nm_gather / nm_build_masks with `table`, `out` and `selection` in
// device memory, one launch each on `stream`.
void nm_gather(const TensorEntry *table, int64_t entries, int32_t n, int32_t m, const TensorEntry *lists,
               int64_t total_tiles, uintptr_t stream);
void nm_build_masks(const TensorEntry *table, int64_t entries, int32_t n, int32_t m, const Selection *selection,
                    int64_t total_tiles, uintptr_t stream);

} // namespace gmp::cuda
#endif
