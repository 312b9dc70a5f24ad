// Fused 4-bit matmul for small batches (decode): out[M, N] = x[M, K] @ W[N, K]^T (+ bias), with W
// in bitsandbytes' 4-bit layout (row-major flat, element 2j in the high nibble of byte j, one
// absmax per `blocksize` flat elements, optionally double-quantized to 8 bits). Each weight byte
// is read from memory once and decoded in registers: no dequantized W, no float32 absmax.
//
// At M = 1..64 the layer is bound by the bytes of W, so the kernel is built around moving them.
// Three kernels share the warp step described here (mma_step): the register kernel below, which
// loads W into registers (any GPU from sm_80), and on sm_90 two that stream W through shared
// memory by the TMA: the bulk kernel (1-8 tokens) and the rows kernel (9-64, and 1-8 on the
// largest layers), each explained where it is defined.
//
// * Tensor cores do the arithmetic: mma.sync m16n8k16 with W as the A operand (16 weight rows)
//   and x^T as B (8 tokens), float32 accumulators. A warp owns R row tiles of 16 rows and T * 8
//   tokens (T n-tiles of 8): each decoded weight fragment feeds T MMAs (for M > 1 the decode is
//   paid once for all rows of x), and each x fragment feeds R row tiles (x is re-read from L2
//   once per 16 R weight rows, which is what bounds 16-32 tokens).
// * No data shuffling: a dot product does not care in which order it walks K, only that A and B
//   walk it in the same order. Lane (g = lane / 4, t = lane % 4) loads 16 bytes (32 elements
//   k0 .. k0 + 31, k0 = 128 * step + 32 * t) of weight rows g and g + 8, and the 64 bytes of x
//   over the same 32 elements for token g. MMA sub-step s (0..7) then uses byte 2s of each row
//   chunk as its A pair (cols 2t, 2t+1) and byte 2s + 1 as the pair at cols 2t + 8, 2t + 9, and
//   x words 2s and 2s + 1 as B: exactly the elements k0 + 4s .. k0 + 4s + 3 on both sides.
//   Every global load is a 16-byte load of bitsandbytes' own layout, no repacking.
// * Decoding a byte is one shared-memory load: a 256-entry table maps a packed byte to its two
//   16-bit code values (a ready bf16x2 / half2 A register), then one HMUL2 by the block's absmax.
//   The table is replicated per lane (entry b of lane L at word 32 b + L, bank L), so the 32
//   lanes' random bytes never conflict: 32 KB of shared memory, written with 16-byte stores.
// * A 32-element chunk never straddles an absmax block (blocks are multiples of 32 and K % 32
//   == 0), so each chunk has one scale.
// * Split-K inside the CTA: its 8 warps take the K steps of one 16 R-row tile round-robin and
//   reduce through shared memory at the end. One launch, no workspace, deterministic sums; an
//   N = 4096 layer still gives 256 CTAs of 8 warps at R = 1 (about two per SM on an H100).
// * Each warp keeps D steps of weight loads in flight (a register ring) while it decodes one.
// * What bounds it (ncu, H100, M = 1, 22016 x 8192): instructions, not DRAM. The table lookups,
//   HMUL2s and MMAs are most of them; DRAM ran at 47% of peak with issue slots 65% busy at 37%
//   occupancy. Instructions a warp step of 1 KB of weights (M <= 8, counted in the SASS): 390
//   with word-indexed lookups and 64-bit block arithmetic, 274 with byte offsets and 32-bit
//   blocks, 249 now that loop invariants stay in registers (keep) and the table's address sits
//   in a uniform register (the shuffled warp index).
//
// Numerics: code values are rounded to x's 16-bit type, multiplied by the absmax (also rounded
// to it) in that type, then summed by the MMA in float32. That is two more roundings than
// x.float() @ dequantize(W).float().T: about 2^-8 relative per weight for bf16, averaging out
// over K (the tests bound the result at 1e-2 for bf16 and 2e-3 for fp16).
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <mutex>
#include <limits>
#include <string>
#include <vector>
#include <type_traits>

#include <cuda.h>
#include <cudaTypedefs.h>

#include "common.cuh"
#include "decode_4bit.cuh"
#include "tma.cuh"

namespace qlora_kernels {
namespace {

constexpr int kMmWarps = 8;                 // K-slices (warps) per CTA
constexpr int kMmThreads = kMmWarps * 32;
constexpr int kTileRows = 16;               // weight rows per CTA: the MMA's m
constexpr int kStepK = 128;                 // K elements per warp step: 4 lanes x 32

// What one warp step reads from global memory for one lane: 16 bytes of each of its two weight
// rows and the raw absmax of both chunks (the float32 bits, or the 8-bit code and its nested
// absmax). Loaded two steps ahead of its use, so that the loads of the next steps are in flight
// while this one is decoded (loading each step when it came left an H100 at 20-55% of copy
// bandwidth).
struct StepLoads {
  uint4 wa, wb;
  ScaleLoads s;
};

__device__ __forceinline__ StepLoads load_step(const RowStart& ra, const RowStart& rb, int k0, bool k_ok,
                                               const void* __restrict__ absmax, bool nested,
                                               const float* __restrict__ nested_absmax, int lg_bs,
                                               int lg_nbs) {
  StepLoads l;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  // Evict-first: each weight byte is read once; x stays cached for the other CTAs.
  l.wa = k_ok ? __ldcs(reinterpret_cast<const uint4*>(ra.bytes + k0 / 2)) : zero;
  l.wb = k_ok ? __ldcs(reinterpret_cast<const uint4*>(rb.bytes + k0 / 2)) : zero;
  l.s = load_scales(ra, rb, k0, k_ok, absmax, nested, nested_absmax, lg_bs, lg_nbs);
  return l;
}

__device__ __forceinline__ uint32_t word_of(const uint4& u, int i) {
  return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

// Returns v unchanged, but through an empty asm statement, so the compiler no longer knows how v
// was computed and keeps it in a register. Without it NVVM re-derives loop invariants (row
// starts, x's row pointers) inside the main loop to shorten their live ranges: about 15 extra
// instructions a warp step, in a kernel bound by its instruction count.
template <typename V>
__device__ __forceinline__ V keep(V v) {
  static_assert(sizeof(V) == 4 || sizeof(V) == 8, "keep: 32- or 64-bit values");
  if constexpr (sizeof(V) == 8) {
    uint64_t u;
    memcpy(&u, &v, 8);
    asm volatile("" : "+l"(u));
    memcpy(&v, &u, 8);
  } else {
    uint32_t u;
    memcpy(&u, &v, 4);
    asm volatile("" : "+r"(u));
    memcpy(&v, &u, 4);
  }
  return v;
}

// L2 prefetches of the absmax (and nested absmax) a lane's rows ra and rb need at k0: before
// pdl_wait they are the only reads a kernel may issue (see launch_pdl).
__device__ __forceinline__ void prefetch_scales_l2(const RowStart& ra, const RowStart& rb, int k0,
                                                   const void* absmax, bool nested, const float* nested_absmax,
                                                   int lg_bs, int lg_nbs) {
  const uint32_t ba = ra.block + ((ra.in_block + k0) >> lg_bs);
  const uint32_t bb = rb.block + ((rb.in_block + k0) >> lg_bs);
  if (nested) {
    prefetch_l2(static_cast<const uint8_t*>(absmax) + ba);
    prefetch_l2(static_cast<const uint8_t*>(absmax) + bb);
    prefetch_l2(nested_absmax + (ba >> lg_nbs));
  } else {
    prefetch_l2(static_cast<const float*>(absmax) + ba);
    prefetch_l2(static_cast<const float*>(absmax) + bb);
  }
}

template <int kR, int kT>
__device__ __forceinline__ void zero_acc(float (&acc)[kR][kT][4]) {
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int n = 0; n < kT; ++n) acc[r][n][0] = acc[r][n][1] = acc[r][n][2] = acc[r][n][3] = 0.0f;
}

// Each row tile's two chunk scales for a step (chunk_scale of its rows g and g + 8).
template <typename T, int kR>
__device__ __forceinline__ void step_scales(const ScaleLoads (&raw)[kR], bool k_ok, bool nested, const float* s_code8,
                                            float offset, uint32_t (&s_lo)[kR], uint32_t (&s_hi)[kR]) {
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    s_lo[r] = chunk_scale<T>(raw[r].ra, raw[r].na, k_ok, nested, s_code8, offset);
    s_hi[r] = chunk_scale<T>(raw[r].rb, raw[r].nb, k_ok, nested, s_code8, offset);
  }
}

// Each n-tile's token row of x for lane group g (x_tok[n], stride elements a row): a token past M
// reads row M - 1 (valid memory) and is zeroed by its tok_ok[n].
template <typename T, int kT>
__device__ __forceinline__ void token_rows(const T* x, int tok0, int g, int M, int64_t stride, const T* (&x_tok)[kT],
                                           bool (&tok_ok)[kT]) {
#pragma unroll
  for (int n = 0; n < kT; ++n) {
    const int tok = tok0 + n * 8 + g;
    tok_ok[n] = tok < M;
    x_tok[n] = keep(x + static_cast<int64_t>(min(tok, M - 1)) * stride);
  }
}

// One warp step: this lane's 16 bytes of rows g and g + 8 of each row tile (w_lo, w_hi), with
// their chunks' scales, decoded through the table (entry) and multiplied by the 32 elements of x
// they meet: x_at(n, q) returns x words 4q .. 4q + 3 (elements k0 + 8q .. k0 + 8q + 7) of
// n-tile n's token g (zero where the step is past K), from global memory or shared.
template <typename T, int kT, int kR, typename XAt, typename Entry>
__device__ __forceinline__ void mma_step(float (&acc)[kR][kT][4], const uint4 (&w_lo)[kR], const uint4 (&w_hi)[kR],
                                         const uint32_t (&s_lo)[kR], const uint32_t (&s_hi)[kR], XAt x_at,
                                         Entry entry) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint4 xq[kT];
#pragma unroll
    for (int n = 0; n < kT; ++n) xq[n] = x_at(n, q);
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const uint32_t lo_word = word_of(w_lo[r], q);
      const uint32_t hi_word = word_of(w_hi[r], q);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // Sub-step s = 2q + half: bytes 2s, 2s + 1 of the chunk = bytes 2 half, 2 half + 1 of
        // word q; byte j's table offset 128 * byte is (word << 7, word >> 1, word >> 9,
        // word >> 17) & 0x7f80.
        uint32_t a[4];
        if (half == 0) {
          a[0] = scale_pair<T>(entry((lo_word << 7) & 0x7f80u), s_lo[r]);
          a[2] = scale_pair<T>(entry((lo_word >> 1) & 0x7f80u), s_lo[r]);
          a[1] = scale_pair<T>(entry((hi_word << 7) & 0x7f80u), s_hi[r]);
          a[3] = scale_pair<T>(entry((hi_word >> 1) & 0x7f80u), s_hi[r]);
        } else {
          a[0] = scale_pair<T>(entry((lo_word >> 9) & 0x7f80u), s_lo[r]);
          a[2] = scale_pair<T>(entry((lo_word >> 17) & 0x7f80u), s_lo[r]);
          a[1] = scale_pair<T>(entry((hi_word >> 9) & 0x7f80u), s_hi[r]);
          a[3] = scale_pair<T>(entry((hi_word >> 17) & 0x7f80u), s_hi[r]);
        }
#pragma unroll
        for (int n = 0; n < kT; ++n) {
          const uint32_t b0 = half ? xq[n].z : xq[n].x;
          const uint32_t b1 = half ? xq[n].w : xq[n].y;
          mma_16816<T>(acc[r][n], a, b0, b1);
        }
      }
    }
  }
}

// The weights one launch multiplies the same x by: one, or a few projections of one input (q, k
// and v; gate and up) side by side, so that decode pays one launch, one ramp-up and one tail for
// them instead of one each (a 4096 x 4096 layer is a few microseconds of bytes). They share x,
// K, the format and the 8-bit code; each has its own rows, absmax, output and bias. Their row
// tiles are numbered in a row: weight i has tiles tile_end[i - 1] .. tile_end[i] - 1. The
// kernel that picks its weight at run time (kGrouped) is compiled for decode batches (M <= 8)
// only; the plain one (one weight, picked at compile time) runs everything else. On an H100
// (7B decode, CUDA graphs, step compiled) q/k/v and gate/up grouped took 269.8 tokens/s
// against 240.5 ungrouped in the same run.
constexpr int kMaxWeights = 4;

template <typename T>
struct WeightSet {
  const uint8_t* packed[kMaxWeights];
  const void* absmax[kMaxWeights];
  const float* nested_absmax[kMaxWeights];
  const float* offset[kMaxWeights];
  const T* bias[kMaxWeights];
  T* out[kMaxWeights];
  int N[kMaxWeights];
  int tile_end[kMaxWeights];  // INT_MAX past the last weight
};

// a[i] for a warp-uniform i, by selects: indexing a kernel parameter array with a register would
// copy the array to local memory
template <typename V>
__device__ __forceinline__ V pick(const V (&a)[kMaxWeights], int i) {
  V v = a[0];
#pragma unroll
  for (int j = 1; j < kMaxWeights; ++j) v = i == j ? a[j] : v;
  return v;
}

// How an output tile is stored: out_store(...)(group, idx, sum) puts the sum of accumulator idx
// of row group `group` (as reduce_tiles numbers them) of row tile `tile` of weight which_out into
// the output, with the bias (or, with partial, the float32 sum of K split `split`, no bias).
template <typename T, int kT, int kR, int kRowWarps>
__device__ __forceinline__ auto out_store(const WeightSet<T>& weights, int which_out, int tile, int tok0, int M,
                                          float* __restrict__ partial, int split) {
  T* __restrict__ out = pick(weights.out, which_out);
  const T* __restrict__ bias = pick(weights.bias, which_out);
  const int n_out = pick(weights.N, which_out);
  const int row_out0 = tile * kTileRows * kR * kRowWarps;
  return [=](int group, int idx, float sum) {
    // Accumulator i of n-tile n of row tile r in lane L: row 16 r + g (+8 for i >= 2), token 2t + (i & 1).
    const int L = idx & 31;
    const int i = (idx >> 5) & 3;
    const int n = (idx >> 7) % kT;
    const int r = (idx >> 7) / kT;
    const int row = row_out0 + group * kTileRows * kR + 16 * r + (L >> 2) + (i >= 2 ? 8 : 0);
    const int tok = tok0 + n * 8 + 2 * (L & 3) + (i & 1);
    if (row < n_out && tok < M) {
      if (partial != nullptr) {
        partial[(static_cast<int64_t>(split) * M + tok) * n_out + row] = sum;  // the bias comes with the sum
      } else {
        if (bias != nullptr) sum += to_float(bias[row]);
        out[static_cast<int64_t>(tok) * n_out + row] = from_float<T>(sum);
      }
    }
  };
}

// After the main loop: sums the partial tiles of each row group's warps (the kMmWarps / kRowWarps
// warps that split its K steps) through s_red (the table's memory, no longer read, or a buffer of
// its own) and hands each sum to emit(group, idx, sum). In as many passes (of kR / kPasses row
// tiles each) as the table's memory takes: accumulator i of n-tile n of row tile
// pass * kR / kPasses + r, lane L, warp w at s_red[w * kPassFloats + ((r * kT + n) * 4 + i) * 32 + L].
// sync: a barrier over the kMmThreads threads that take part.
template <int kT, int kR, int kRowWarps, typename Sync, typename Emit>
__device__ __forceinline__ void reduce_tiles(const float (&acc)[kR][kT][4], float* s_red, int warp, int lane, Sync sync,
                                             Emit emit) {
  constexpr int kSlices = kMmWarps / kRowWarps;
  constexpr int kTileFloats = 4 * kR * kT * 32;  // one warp's accumulators
  constexpr int kPasses = (kMmWarps * kTileFloats * 4 + kTableBytes - 1) / kTableBytes;
  static_assert(kR % kPasses == 0, "partial tiles: kR must split into the reduction passes");
  constexpr int kPassFloats = kTileFloats / kPasses;
  const int tid = warp * 32 + lane;
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    constexpr int kPassR = kR / kPasses;
    sync();  // the table (or the last pass's sums) is no longer read
#pragma unroll
    for (int r = 0; r < kPassR; ++r)
#pragma unroll
      for (int n = 0; n < kT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          s_red[warp * kPassFloats + ((r * kT + n) * 4 + i) * 32 + lane] = acc[pass * kPassR + r][n][i];
    sync();
    for (int idx = tid; idx < kRowWarps * kPassFloats; idx += kMmThreads) {
      const int group = idx / kPassFloats, within = idx % kPassFloats;
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kSlices; ++w) sum += s_red[(group * kSlices + w) * kPassFloats + within];
      emit(group, pass * kPassFloats + within, sum);
    }
  }
}

// Whether the kernel for kT n-tiles reads x permuted: at 33-64 tokens (kT = 8) it cut 22016 x
// 8192 from 270 to 216 us (H100, 1 row tile); at 9-32 tokens the extra launch and copy cost
// about what the loads saved, so x is read as it is there.
template <int kT>
constexpr bool kPermuteX = kT >= 8;

// kT: n-tiles of 8 tokens per warp (up to 64 tokens per CTA). kR: 16-row tiles per warp, all fed
// by the same x fragments (x is read from L2 once per kR * 16 weight rows instead of once per 16).
// kD: steps of weight loads in flight per warp. (Splitting K over the CTAs of a cluster, adding
// the partial tiles through distributed shared memory, was tried on the H100 and never won.)
// kRowWarps: row groups per CTA. At 1 the 8 warps split the K steps of one group of kR row
// tiles; at 8 each warp owns its own group and walks all of K. With more tokens x is the larger
// stream (64 tokens: 16 bytes of x per weight byte, re-read from L2 by every row group), and the
// row groups of a CTA walk the same K steps at about the same time, so L1 serves x to all but the
// first of them. Fewer, longer CTAs then get K split over the grid's z (blockIdx.z takes steps
// split_steps * z ..): each writes a float32 partial tile, summed by sum_k_splits_kernel.
template <typename T, int kT, int kR, int kD, bool kGrouped, int kRowWarps>
__global__ void __launch_bounds__(kMmThreads)
    matmul_4bit_kernel(const T* __restrict__ x, const __grid_constant__ WeightSet<T> weights,
                       const float* __restrict__ nested_code, int M, int K, int lg_bs, int lg_nbs,
                       int quant_type, bool nested, int split_steps, float* __restrict__ partial,
                       int64_t x_stride) {
  static_assert(kMmWarps % kRowWarps == 0 && (!kGrouped || kRowWarps == 1), "row groups: 1, 2, 4 or 8; grouped: 1");
  constexpr int kSlices = kMmWarps / kRowWarps;  // warps sharing one row group's K steps
  // The byte -> pair table; after the main loop the same memory holds the warps' partial sums.
  __shared__ __align__(16) uint8_t s_table[kTableBytes];
  __shared__ float s_code8[256];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  // Warp w takes K steps w, w + kMmWarps, ... Its index goes through a shuffle, so that the
  // compiler knows it (and with it the main loop's trip count) is the same for all lanes: then it
  // keeps the table's shared address in a uniform register, which every lookup adds for free
  // ([R + UR] addressing).
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  const int row_group = warp / kSlices;
  const int slice = warp % kSlices;
  const int g = lane >> 2;
  const int t = lane & 3;

  // This CTA's weight, and its row tile in that weight. (The output and bias are picked again
  // after the main loop: kept from here, their registers pushed the T >= 2 kernels into spills.)
  auto which_weight = [&]() {
    int which = 0;
#pragma unroll
    for (int i = 0; i + 1 < kMaxWeights; ++i) which += static_cast<int>(blockIdx.x) >= weights.tile_end[i] ? 1 : 0;
    return which;
  };
  const int which = kGrouped ? which_weight() : 0;
  const uint8_t* __restrict__ packed = pick(weights.packed, which);
  const void* __restrict__ absmax = pick(weights.absmax, which);
  const float* __restrict__ nested_absmax = pick(weights.nested_absmax, which);
  const float* __restrict__ offset = pick(weights.offset, which);
  const int N = pick(weights.N, which);
  const int first_tile = which == 0 ? 0 : pick(weights.tile_end, which - 1);
  const int row0 = (static_cast<int>(blockIdx.x) - first_tile) * kTileRows * kR * kRowWarps + row_group * kTileRows * kR;
  const int tok0 = blockIdx.y * kT * 8;
  // This lane's two rows in each row tile. Rows past N load row N - 1 (valid memory) and are
  // not stored.
  RowStart lo_row[kR], hi_row[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    lo_row[r] = row_start(packed, min(row0 + 16 * r + g, N - 1), K, lg_bs);
    hi_row[r] = row_start(packed, min(row0 + 16 * r + g + 8, N - 1), K, lg_bs);
    lo_row[r] = {keep(lo_row[r].bytes), keep(lo_row[r].block), keep(lo_row[r].in_block)};
    hi_row[r] = {keep(hi_row[r].bytes), keep(hi_row[r].block), keep(hi_row[r].in_block)};
  }
  const int nsteps = (K + kStepK - 1) / kStepK;
  // This CTA's K steps (all of them unless K is split over the grid's z)
  const int step_begin = static_cast<int>(blockIdx.z) * split_steps;
  const int step_end = min(nsteps, step_begin + split_steps);
  // K % 32 == 0: a lane's 32-element chunk is wholly inside K or wholly past it. A lane past
  // K still takes part in the MMAs (they are warp-wide), with a zero scale and zero x.
  auto step_k0 = [&](int step) { return step * kStepK + t * 32; };
  auto load = [&](int r, int step) {
    const int k0 = step_k0(step);
    return load_step(lo_row[r], hi_row[r], k0, step < step_end && k0 < K, absmax, nested, nested_absmax,
                     lg_bs, lg_nbs);
  };
  // Launched with PDL (launch_pdl): the loads below may read what the kernel before wrote.
  pdl_launch_dependents();
  pdl_wait();
  // kD steps of loads are kept in flight ahead of the one being decoded; the first ones go out
  // before the table is built, so they overlap with it.
  StepLoads ring[kD][kR];
#pragma unroll
  for (int d = 0; d < kD; ++d)
#pragma unroll
    for (int r = 0; r < kR; ++r) ring[d][r] = load(r, step_begin + slice + d * kSlices);

  build_pair_table<T>(s_table, quant_type, tid, kMmThreads);
  load_code8(s_code8, nested_code, nested, tid, kMmThreads);
  __syncthreads();

  const float off = nested ? __ldg(offset) : 0.0f;
  const PairLookup entry{s_table, keep(4u * lane)};
  // Each n-tile's token row of x (a token past M reads row M - 1 and is multiplied by zero).
  // With kPermuteX (33-64 tokens) x comes permuted (permute_x_kernel): rows of x_stride elements,
  // and within each step of 128 elements, lane t's 16 bytes for sub-step word q at 32 q + 8 t.
  const T* x_tok[kT];
  bool tok_ok[kT];
  token_rows(x, tok0, g, M, x_stride, x_tok, tok_ok);

  float acc[kR][kT][4];
  zero_acc(acc);

  for (int base = step_begin + slice; base < step_end; base += kD * kSlices) {
#pragma unroll
    for (int d = 0; d < kD; ++d) {
      const int step = base + d * kSlices;
      if (step >= step_end) break;  // warp-uniform
      StepLoads cur[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        cur[r] = ring[d][r];
        ring[d][r] = load(r, step + kD * kSlices);
      }
      const int k0 = step_k0(step);
      const bool k_ok = k0 < K;
      ScaleLoads raw[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) raw[r] = cur[r].s;
      uint32_t s_lo[kR], s_hi[kR];
      step_scales<T>(raw, k_ok, nested, s_code8, off, s_lo, s_hi);
      uint4 w_lo[kR], w_hi[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        w_lo[r] = cur[r].wa;
        w_hi[r] = cur[r].wb;
      }
      const int x_off = kPermuteX<kT> ? step * kStepK + 8 * t : k0;
      auto x_at = [&](int n, int q) {
        const uint4* x_step = reinterpret_cast<const uint4*>(x_tok[n] + x_off);
        return k_ok && tok_ok[n] ? __ldg(x_step + (kPermuteX<kT> ? 4 * q : q)) : make_uint4(0, 0, 0, 0);
      };
      mma_step<T, kT, kR>(acc, w_lo, w_hi, s_lo, s_hi, x_at, entry);
    }
  }

  const int which_out = kGrouped ? keep(which_weight()) : 0;
  const int tile_out = static_cast<int>(blockIdx.x) - (which_out == 0 ? 0 : pick(weights.tile_end, which_out - 1));
  reduce_tiles<kT, kR, kRowWarps>(acc, reinterpret_cast<float*>(s_table), warp, lane, [] { __syncthreads(); },
                                  out_store<T, kT, kR, kRowWarps>(weights, which_out, tile_out, tok0, M, partial,
                                                                  static_cast<int>(blockIdx.z)));
}

// ---------------------------------------------------------------------------------------------
// sm_90 and up, 1-8 tokens: the same tiles and arithmetic, with the weights streamed into shared
// memory by bulk copies (the TMA) instead of loaded into registers.
//
// Why: the register kernel's loads, not only its arithmetic, bound it at few tokens. Its warps
// each load 16 rows x 64 bytes at a time (4 lanes a row), and 8 warps walk a row 64 bytes apart.
// A read-only test of that pattern on an H100 (no decode, 3 CTAs per SM, as the kernel runs) moved
// 8192 x 22016 at 1845 GB/s and 22016 x 8192 at 2426 GB/s, where warps reading 512 contiguous
// bytes of one row reached 2810 and 2885 (device copy: ~3000); the kernel ran at 1647 and 1677.
//
// How: a producer warp copies, for each stage of kBulkStageK elements, the 512-byte piece of each
// of the tile's 16 rows with one cp.async.bulk each (contiguous, as DRAM likes them), with no
// registers held for bytes in flight. A stage's mbarrier `full` counts its bytes; the 8 consumer
// warps wait on it, take one 128-element step each (the register kernel's step, its 16 bytes of
// rows g and g + 8 now read from shared memory), and release the stage on `empty` as soon as
// those bytes are in registers. The absmax still comes through the L1, two stages ahead. The CTAs
// are persistent (one launch, no split-K; see the kernel). Two stages: on an H100 more lost (by up
// to 20% at 8 tokens), as the shared memory they take comes out of the L1 that keeps x.
// ncu, 22016 x 8192 at one token: issue slots 65% busy, ~290 instructions a 1 KB warp step (the
// table lookups, HMUL2s and MMAs): the decode's instructions are what bound it now.
constexpr int kBulkStageK = 1024;          // K elements per stage: one 128-element step per consumer warp
// A row piece's pitch in shared memory: 512 bytes + 64, so that a row starts 36 16-byte units
// after the last (4 mod 8): the 8 lanes of a quarter warp (rows g, g + 1 x lanes t 0..3) read 8
// different bank groups with their 16-byte loads.
constexpr int kBulkRowPitch = kBulkStageK / 2 + 64;
constexpr int kBulkThreads = kMmThreads + 32;  // 8 consumer warps, 1 producer warp
// Stages in shared memory: on an H100 two beat three and four on every LLaMA shape at 1 and 8
// tokens (by up to 20% at 8 tokens, where x must stay in the L1 the stages' shared memory takes from).
constexpr int kBulkStages = 2;

template <int kT, int kR, int kStages>
constexpr int bulk_smem_bytes() {
  // table | 8-bit code | the warps' partial tiles | stages | full[kStages], empty[kStages]
  return kTableBytes + 256 * 4 + kMmWarps * 4 * kR * kT * 32 * 4 + kStages * kTileRows * kR * kBulkRowPitch +
         2 * kStages * 8;
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// The stages' barriers, initialized by thread 0 and made visible to the whole CTA (the async
// proxy included) by the CTA's one __syncthreads. It sits here, where every thread of the CTA
// reaches it on the same path: from a producer warp whose lanes had parted in mbarrier waits, a
// __syncthreads was reported by compute-sanitizer's synccheck as divergent, and 28672 x 8192 at
// 32 tokens (K split 7 ways, several CTAs per SM in turn) gave different results from run to run.
// From here on the consumers sync among themselves only (consumer_sync: named barrier 1).
template <int kStages>
__device__ __forceinline__ void init_stage_barriers(uint64_t* full, uint64_t* empty, int tid) {
  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < kStages; ++i) {
      mbarrier_init(&full[i], 1);            // the producer's arrive, plus the stage's bytes
      mbarrier_init(&empty[i], kMmThreads);  // one arrive per consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
}

__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, %0;" ::"n"(kMmThreads) : "memory"); }
#endif

// kDense: compiled for 4 CTAs per SM (at most 56 registers, a few bytes spilled) instead of the
// 3 that its 62 registers leave room for; launch_matmul_4bit_bulk says when it runs. (A minimum
// of 0 CTAs is no bound: the default build; a minimum of 1 gave it 94 registers.)
template <typename T, int kT, int kR, int kStages, bool kGrouped, bool kDense = false>
__global__ void __launch_bounds__(kBulkThreads, kDense ? 4 : 0)
    matmul_4bit_bulk_kernel(const T* __restrict__ x, const __grid_constant__ WeightSet<T> weights, int total_tiles,
                            const float* __restrict__ nested_code, int M, int K, int lg_bs, int lg_nbs,
                            int quant_type, bool nested) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kRows = kTileRows * kR;
  constexpr int kStageBytes = kRows * kBulkRowPitch;
  constexpr int kTileFloats = 4 * kR * kT * 32;
  constexpr int kRedBytes = kMmWarps * kTileFloats * 4;
  static_assert(kRedBytes <= kTableBytes, "partial tiles: one reduction pass");
  extern __shared__ __align__(128) uint8_t smem[];
  uint8_t* s_table = smem;
  float* s_code8 = reinterpret_cast<float*>(smem + kTableBytes);
  float* s_red = reinterpret_cast<float*>(smem + kTableBytes + 256 * 4);
  uint8_t* s_stages = smem + kTableBytes + 256 * 4 + kRedBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(s_stages + kStages * kStageBytes);
  uint64_t* empty = full + kStages;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);  // warp-uniform, as in the register kernel
  const int g = lane >> 2;
  const int t = lane & 3;
  const int nstages = (K + kBulkStageK - 1) / kBulkStageK;
  // Persistent CTAs: this one takes row tiles blockIdx.x, + gridDim.x, ... (the grid is as many
  // CTAs as fit on the GPU at once), so that the table is built once per CTA and the producer
  // streams the next tile's first stages while the consumers reduce the last one. Two ways to
  // even out the last round were slower on an H100 (the LLaMA shapes at 1 and 8 tokens): equal
  // contiguous ranges of stages per CTA (stream-K), tiles cut between CTAs summed through global
  // memory (22016 x 8192 at one token 56 us against 48, 4096 x 4096 17 against 10); and K split
  // over the work items, the splits summed by sum_k_splits_kernel, where fewer rounds promised it
  // (up to 30% slower, 11% faster on 8192 x 22016 at 8 tokens).
  const int first = static_cast<int>(blockIdx.x), stride = static_cast<int>(gridDim.x);
  struct Tile {
    int which, row0;
  };
  auto tile_at = [&](int tile) {
    int which = 0;
    if constexpr (kGrouped) {
#pragma unroll
      for (int i = 0; i + 1 < kMaxWeights; ++i) which += tile >= weights.tile_end[i] ? 1 : 0;
    }
    const int first_tile = which == 0 ? 0 : pick(weights.tile_end, which - 1);
    return Tile{which, (tile - first_tile) * kRows};
  };

  init_stage_barriers<kStages>(full, empty, tid);
  if (warp == kMmWarps) {
    // The producer. Lane i copies row pieces i, i + 32, ... (rows past N copy row N - 1: valid
    // memory, never stored). Its first kStages stages go out while the table is built (they need
    // no slot freed).
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    constexpr int kPerLane = (kRows + 31) / 32;
    pdl_wait();
    int count = 0;  // stages issued
    for (int tile = first; tile < total_tiles; tile += stride) {
      const Tile tl = tile_at(tile);
      const uint8_t* __restrict__ packed = pick(weights.packed, tl.which);
      const int N = pick(weights.N, tl.which);
      const uint8_t* src[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j)
        src[j] = packed + static_cast<int64_t>(min(tl.row0 + lane + 32 * j, N - 1)) * (K / 2);
      for (int s = 0; s < nstages; ++s, ++count) {
        const int slot = count % kStages;
        // The slot's last use (stage count - kStages) must have been read out by all consumers.
        if (count >= kStages) {
          mbarrier_wait(&empty[slot], ((count / kStages) & 1) ^ 1);
          fence_reads_before_async_copy();
        }
        const int k0 = s * kBulkStageK;
        const uint32_t bytes = static_cast<uint32_t>(min(kBulkStageK, K - k0) / 2);  // K % 32 == 0: a multiple of 16
        if (lane == 0) mbarrier_expect_bytes(&full[slot], bytes * kRows);
        __syncwarp();
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int r = lane + 32 * j;
          if (r < kRows)
            bulk_copy(s_stages + slot * kStageBytes + r * kBulkRowPitch, src[j] + k0 / 2, bytes, &full[slot], policy);
        }
      }
    }
    return;
  }

  build_pair_table<T>(s_table, quant_type, tid, kMmThreads);
  const int tok0 = blockIdx.y * kT * 8;
  const PairLookup entry{s_table, keep(4u * lane)};
  const T* x_tok[kT];
  bool tok_ok[kT];
  token_rows(x, tok0, g, M, K, x_tok, tok_ok);
  // Consumer warp w takes elements 128 w .. 128 w + 127 of every stage; lane t 32 of them.
  auto step_k0 = [&](int s) { return s * kBulkStageK + 128 * warp + 32 * t; };
  // A tile, and this lane's two rows in each of its row tiles (for their absmax blocks).
  struct TileRows {
    Tile tl;
    RowStart lo[kR], hi[kR];
  };
  auto rows_of = [&](int tile) {
    TileRows tr;
    tr.tl = tile_at(tile);
    const uint8_t* packed = pick(weights.packed, tr.tl.which);
    const int N = pick(weights.N, tr.tl.which);
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      tr.lo[r] = row_start(packed, min(tr.tl.row0 + 16 * r + g, N - 1), K, lg_bs);
      tr.hi[r] = row_start(packed, min(tr.tl.row0 + 16 * r + g + 8, N - 1), K, lg_bs);
    }
    return tr;
  };
  auto scales = [&](const TileRows& tr, int r, int s) {
    const int k0 = step_k0(s);
    return load_scales(tr.lo[r], tr.hi[r], k0, s < nstages && k0 < K, pick(weights.absmax, tr.tl.which), nested,
                       pick(weights.nested_absmax, tr.tl.which), lg_bs, lg_nbs);
  };
  constexpr int kAhead = 2;  // stages of absmax loads in flight
  ScaleLoads ring[kAhead][kR];
  auto prefetch = [&](const TileRows& tr) {
#pragma unroll
    for (int d = 0; d < kAhead; ++d)
#pragma unroll
      for (int r = 0; r < kR; ++r) ring[d][r] = scales(tr, r, d);
  };
  // This lane's 16 bytes of rows g and g + 8 within a stage.
  const uint32_t lane_bytes = keep(static_cast<uint32_t>(g * kBulkRowPitch + 64 * warp + 16 * t));
  TileRows tr = rows_of(first);
  if (first < total_tiles) {
#pragma unroll
    for (int r = 0; r < kR; ++r)
      prefetch_scales_l2(tr.lo[r], tr.hi[r], step_k0(0), pick(weights.absmax, tr.tl.which), nested,
                         pick(weights.nested_absmax, tr.tl.which), lg_bs, lg_nbs);
  }
  pdl_wait();
  load_code8(s_code8, nested_code, nested, tid, kMmThreads);
  consumer_sync();  // the table and the code
  if (first < total_tiles) prefetch(tr);
  int count = 0;  // stages consumed
  for (int tile = first; tile < total_tiles; tile += stride) {
    const float tile_off = nested ? __ldg(pick(weights.offset, tr.tl.which)) : 0.0f;
    float acc[kR][kT][4];
    zero_acc(acc);
    for (int base = 0; base < nstages; base += kAhead) {
#pragma unroll
      for (int d = 0; d < kAhead; ++d) {
        const int s = base + d;
        if (s >= nstages) break;  // warp-uniform
        ScaleLoads cur[kR];
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          cur[r] = ring[d][r];
          ring[d][r] = scales(tr, r, s + kAhead);
        }
        const int k0 = step_k0(s);
        const bool k_ok = k0 < K;
        uint32_t s_lo[kR], s_hi[kR];
        step_scales<T>(cur, k_ok, nested, s_code8, tile_off, s_lo, s_hi);
        const int slot = count % kStages;
        mbarrier_wait(&full[slot], (count / kStages) & 1);
        ++count;
        const uint8_t* stage = s_stages + slot * kStageBytes + lane_bytes;
        uint4 w_lo[kR], w_hi[kR];
        const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          w_lo[r] = k_ok ? *reinterpret_cast<const uint4*>(stage + 16 * r * kBulkRowPitch) : zero;
          w_hi[r] = k_ok ? *reinterpret_cast<const uint4*>(stage + (16 * r + 8) * kBulkRowPitch) : zero;
        }
        // This thread's bytes are in registers: its arrive releases its reads of the slot (each
        // thread's own: one lane arriving for the warp after a __syncwarp leaves the other lanes'
        // reads unordered against the refill for compute-sanitizer's racecheck).
        mbarrier_arrive(&empty[slot]);
        auto x_at = [&](int n, int q) {
          return k_ok && tok_ok[n] ? __ldg(reinterpret_cast<const uint4*>(x_tok[n] + k0) + q) : zero;
        };
        mma_step<T, kT, kR>(acc, w_lo, w_hi, s_lo, s_hi, x_at, entry);
      }
    }
    const Tile done = tr.tl;
    if (tile + stride < total_tiles) {  // the next tile's first absmax loads go out before this one's reduction
      tr = rows_of(tile + stride);
      prefetch(tr);
    } else {
      // The next kernel (launch_pdl) may launch once every CTA is past its main loop, not from
      // their start: the grid often leaves SM slots free (4096 x 11008 at one token: 256 CTAs
      // for 396 slots), and CTAs of the next kernel that took them early, to wait there, slowed
      // this one down (that layer at one token: 14.3 us without PDL, 17.1 with the launch allowed
      // from the start, 15.1 from when the producer had issued its last copy; H100).
      pdl_launch_dependents();
    }
    reduce_tiles<kT, kR, 1>(acc, s_red, warp, lane, [] { consumer_sync(); },
                            out_store<T, kT, kR, 1>(weights, done.which, done.row0 / kRows, tok0, M, nullptr, 0));
  }
#else
  __trap();  // compiled for sm_90 and up only; the host checks the binary before launching
#endif
}

// ---------------------------------------------------------------------------------------------
// sm_90 and up, 9-64 tokens: row warps, with x and the weights both staged in shared memory.
//
// Why: with more tokens, x is the larger stream. Every 16 weight rows meet all of x (16 bytes of
// x per weight byte at 64 tokens), and the register kernel's warps load x into registers from
// L1/L2 for each row tile they decode, then hold it there while the MMAs run: at 33-64 tokens it
// has 255 registers (one CTA per SM) and ran at 0.5-0.8x bf16 on the LLaMA shapes (H100).
//
// How: the CTA's 8 consumer warps each own kR row tiles (16 kR rows) and all walk the same K
// steps, so one copy of x in shared memory serves 128 kR weight rows. Per 128-element step a
// producer warp issues two copies into a stage, counted on the stage's `full` mbarrier: the
// tile's 64 bytes of each row as one 2-D tensor copy, and the step's x as one 3-D tensor copy
// (rows past N, bytes past K and tokens past M come back as zeros). Few, large
// copies matter: the TMA takes about 45 copy instructions per microsecond per SM, so one bulk
// copy per 64-byte row piece read 22016 x 8192's bytes at 383 GB/s, where one box per stage of
// 128 rows x 64 bytes read them at 2457 (H100, copies alone: benchmarks/tma_copy_rates.cu,
// results/.../experiments/matmul_4bit_tma_copy_rates.txt). A warp owns its rows over the whole K
// range, so there is no reduction across warps: the accumulators go straight to the output (or,
// with K split over the grid's z, to float32 partial tiles that sum_k_splits_kernel adds in a
// fixed order).
//
// Shared-memory layout, chosen so that the 8 lanes of each quarter warp (rows g, g + 1 x lanes
// t 0..3) hit 8 different 16-byte bank groups with their 16-byte loads:
// * weights: row i's 64 bytes at 64 i, dense (the tensor copy's box): rows g and g + 1 are 4 units
//   apart, lane t reads unit t of its row;
// * x: x [M, K] seen as a 3-D tensor [M][K / 32][32 elements], one box of (tokens, 4 runs, 32
//   elements) a step: token n's run t (lane t's 32 elements, 64 bytes) at 64 (4 n + t), in the
//   TMA's 64-byte swizzle, which stores 16-byte unit q of the 64 bytes at address A as unit
//   q ^ ((A >> 7) & 3). Rows g and g + 1 of lanes t 0..3 then cover bank groups 4 (t & 1) +
//   (q ^ (2 g + t / 2) & 3): all 8 once. (Before it x went through a staging kernel into padded
//   320-byte token rows: one more launch and pass over x per call.)
constexpr int kRowsStepBytes = kStepK / 2;  // one weight row's bytes per stage
constexpr int kXRunBytes = 64;              // 32 elements of 16 bits: one lane's run of a step
constexpr int kXTokenBytes = 4 * kXRunBytes;

template <int kT, int kR, int kStages>
constexpr int rows_smem_bytes() {
  // table | 8-bit code | stages (weights, then x: both 512-byte aligned, the swizzle's period) |
  // full[kStages], empty[kStages]
  return kTableBytes + 256 * 4 + kStages * (kMmWarps * kTileRows * kR * kRowsStepBytes + kT * 8 * kXTokenBytes) +
         2 * kStages * 8;
}


template <typename T, int kT, int kR, int kStages>
__global__ void __launch_bounds__(kBulkThreads)
    matmul_4bit_rows_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                            const __grid_constant__ WeightSet<T> weights, const float* __restrict__ nested_code, int M,
                            int K, int lg_bs, int lg_nbs, int quant_type, bool nested, int split_steps,
                            float* __restrict__ partial) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kRows = kMmWarps * kTileRows * kR;  // weight rows per CTA
  constexpr int kTokens = kT * 8;
  constexpr int kWeightBytes = kRows * kRowsStepBytes;
  constexpr int kXBytes = kTokens * kXTokenBytes;
  constexpr int kStageBytes = kWeightBytes + kXBytes;
  static_assert(kWeightBytes % 512 == 0 && kXBytes % 512 == 0 && (kTableBytes + 256 * 4) % 512 == 0,
                "x 512-byte aligned in every stage (the swizzle's period): its pattern is the same in all");
  extern __shared__ __align__(1024) uint8_t rows_smem[];
  uint8_t* s_table = rows_smem;
  float* s_code8 = reinterpret_cast<float*>(rows_smem + kTableBytes);
  uint8_t* s_stages = rows_smem + kTableBytes + 256 * 4;
  uint64_t* full = reinterpret_cast<uint64_t*>(s_stages + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  // x's stages are 512-byte aligned (the swizzle's period) through rows_smem's declared
  // alignment: the kernel has no static shared memory, so its dynamic shared memory starts at the
  // window's base.

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);  // warp-uniform, as in the register kernel
  const int g = lane >> 2;
  const int t = lane & 3;
  const uint8_t* __restrict__ packed = weights.packed[0];
  const int N = weights.N[0];
  const int tile = static_cast<int>(blockIdx.x);
  const int tok0 = static_cast<int>(blockIdx.y) * kTokens;
  const int nsteps = (K + kStepK - 1) / kStepK;
  const int step_begin = static_cast<int>(blockIdx.z) * split_steps;
  const int step_end = min(nsteps, step_begin + split_steps);
  const int steps = step_end - step_begin;

  init_stage_barriers<kStages>(full, empty, tid);
  if (warp == kMmWarps) {
    // The producer: its lane 0 issues both copies of each stage; the first kStages go out while
    // the table is built.
    if (lane == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&w_map)) : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<uint64_t>(&x_map)) : "memory");
    }
    pdl_wait();
    uint64_t evict_first, evict_last;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(evict_first));
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(evict_last));  // x: read by every tile
    for (int i = 0; i < steps; ++i) {
      const int slot = i % kStages;
      // The slot's last use (step i - kStages) must have been read out by all consumers.
      if (i >= kStages) {
        mbarrier_wait(&empty[slot], ((i / kStages) & 1) ^ 1);
        fence_reads_before_async_copy();
      }
      if (lane == 0) {
        const int step = step_begin + i;
        uint8_t* stage = s_stages + slot * kStageBytes;
        mbarrier_expect_bytes(&full[slot], kStageBytes);  // a box counts in full, zeros past N and K too
        tensor_copy_2d(stage, &w_map, step * kRowsStepBytes, tile * kRows, &full[slot], evict_first);
        tensor_copy_3d(stage + kWeightBytes, &x_map, 0, 4 * step, tok0, &full[slot], evict_last);
      }
      __syncwarp();
    }
    return;
  }

  build_pair_table<T>(s_table, quant_type, tid, kMmThreads);
  const PairLookup entry{s_table, keep(4u * lane)};
  const void* __restrict__ absmax = weights.absmax[0];
  const float* __restrict__ nested_absmax = weights.nested_absmax[0];
  const int row0 = tile * kRows + warp * kTileRows * kR;
  RowStart lo_row[kR], hi_row[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    lo_row[r] = row_start(packed, min(row0 + 16 * r + g, N - 1), K, lg_bs);
    hi_row[r] = row_start(packed, min(row0 + 16 * r + g + 8, N - 1), K, lg_bs);
    if (step_begin * kStepK + 32 * t < K)
      prefetch_scales_l2(lo_row[r], hi_row[r], step_begin * kStepK + 32 * t, absmax, nested, nested_absmax, lg_bs,
                         lg_nbs);
  }
  pdl_wait();
  load_code8(s_code8, nested_code, nested, tid, kMmThreads);
  consumer_sync();  // the table and the code
  const float off = nested ? __ldg(weights.offset[0]) : 0.0f;
  // Past K a lane's scale is zero (and the copies bring zeros): its MMA terms vanish.
  auto scales = [&](int r, int step) {
    const int k0 = step * kStepK + 32 * t;
    return load_scales(lo_row[r], hi_row[r], k0, step < step_end && k0 < K, absmax, nested, nested_absmax, lg_bs,
                       lg_nbs);
  };
  constexpr int kAhead = 2;  // steps of absmax loads in flight
  ScaleLoads ring[kAhead][kR];
#pragma unroll
  for (int d = 0; d < kAhead; ++d)
#pragma unroll
    for (int r = 0; r < kR; ++r) ring[d][r] = scales(r, step_begin + d);
  // This lane's bytes within a stage: rows g and g + 8 of its row tiles, and unit q of its run
  // of x (token g, run t; swizzled by the bits 7-8 of the run's shared address, the same in every
  // stage and n-tile).
  const uint32_t w_lane = keep(static_cast<uint32_t>((warp * kTileRows * kR + g) * kRowsStepBytes + 16 * t));
  const uint32_t x_run = static_cast<uint32_t>(kWeightBytes + (4 * g + t) * kXRunBytes);
  const uint32_t swizzle = ((shared_address(s_stages + x_run) >> 7) & 3u) * 16u;
  uint32_t x_unit[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) x_unit[q] = keep(x_run + ((16u * q) ^ swizzle));

  float acc[kR][kT][4];
  zero_acc(acc);
  for (int base = 0; base < steps; base += kAhead) {
#pragma unroll
    for (int d = 0; d < kAhead; ++d) {
      const int i = base + d;
      if (i >= steps) break;  // warp-uniform
      const int step = step_begin + i;
      ScaleLoads cur[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        cur[r] = ring[d][r];
        ring[d][r] = scales(r, step + kAhead);
      }
      const bool k_ok = step * kStepK + 32 * t < K;
      uint32_t s_lo[kR], s_hi[kR];
      step_scales<T>(cur, k_ok, nested, s_code8, off, s_lo, s_hi);
      const int slot = i % kStages;
      mbarrier_wait(&full[slot], (i / kStages) & 1);
      const uint8_t* stage = s_stages + slot * kStageBytes;
      uint4 w_lo[kR], w_hi[kR];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        w_lo[r] = *reinterpret_cast<const uint4*>(stage + w_lane + 16 * r * kRowsStepBytes);
        w_hi[r] = *reinterpret_cast<const uint4*>(stage + w_lane + (16 * r + 8) * kRowsStepBytes);
      }
      auto x_at = [&](int n, int q) {
        return *reinterpret_cast<const uint4*>(stage + x_unit[q] + n * 8 * kXTokenBytes);
      };
      mma_step<T, kT, kR>(acc, w_lo, w_hi, s_lo, s_hi, x_at, entry);
      mbarrier_arrive(&empty[slot]);  // this thread's reads of the slot (weights and x) are done
    }
  }
  pdl_launch_dependents();  // past the main loop, as in the bulk kernel
  // Each warp holds whole sums for its rows: no reduction across warps.
  auto emit = out_store<T, kT, kR, kMmWarps>(weights, 0, tile, tok0, M, partial, static_cast<int>(blockIdx.z));
#pragma unroll
  for (int r = 0; r < kR; ++r)
#pragma unroll
    for (int n = 0; n < kT; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) emit(warp, ((r * kT + n) * 4 + i) * 32 + lane, acc[r][n][i]);
#else
  __trap();  // compiled for sm_90 and up only; the host checks the binary before launching
#endif
}

// x [M, K] -> xp [M, x_stride] (x_stride: K rounded up to a step), so that the 4 lanes of a
// token read 64 contiguous bytes per sub-step word instead of 16 bytes at a 64-byte stride: within
// each 128-element step, the 8-element unit 4 t + q (lane t's word q, elements 32 t + 8 q ..)
// moves to unit 4 q + t. Measured by ncu at 64 tokens (22016 x 8192, H100): L1 throughput was the
// bound (89%), x's strided loads most of it. Units whose source is past K are not written (only
// lanes past K would read them, and those load nothing).
template <typename T>
__global__ void permute_x_kernel(const T* __restrict__ x, T* __restrict__ xp, int64_t M, int K, int64_t x_stride) {
  pdl_launch_dependents();
  pdl_wait();  // x may come from the kernel just before (launch_pdl)
  const int64_t units_per_row = x_stride / 8;
  const int64_t total = M * units_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / units_per_row;
    const int64_t unit = i % units_per_row;
    const int64_t src = (unit & ~int64_t{15}) | ((unit & 3) << 2) | ((unit >> 2) & 3);
    if (src * 8 < K)
      reinterpret_cast<uint4*>(xp)[i] = reinterpret_cast<const uint4*>(x + row * K)[src];
  }
}

// out[m, n] = the sum over the K splits of partial[z, m, n] (+ bias[n]), in a fixed order.
template <typename T>
__global__ void sum_k_splits_kernel(const float* __restrict__ partial, int splits, int64_t MN, int N,
                                    const T* __restrict__ bias, T* __restrict__ out) {
  pdl_launch_dependents();
  pdl_wait();  // the partial tiles: written by the kernel just before (launch_pdl)
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < MN;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += partial[z * MN + i];
    if (bias != nullptr) sum += to_float(bias[i % N]);
    out[i] = from_float<T>(sum);
  }
}

// The (kR, kD, kW) compiled for each kT: the ones tile_config picks (from a sweep of kR 1, 2, 4 and
// kD 2, 4 over the LLaMA shapes on an H100; benchmarks/bench_matmul_4bit.py --tiles), and the row
// groups (kW 4, 8) for tuning: on the H100 they won only by 3-6% on a few of the largest layers
// at 48-64 tokens, and lost elsewhere, so the default does not pick them.
template <int kT, int kR, int kD, int kW>
constexpr bool kCompiled =
    kW == 1 ? (kT == 1 && kR == 1) || (kT == 2 && kR == 2) || (kT == 2 && kR == 4 && kD == 2) ||
                  (kT == 4 && kR == 2 && kD == 2) || (kT == 8 && kR == 1) || (kT == 8 && kR == 2 && kD == 2)
            : kT >= 2 && kD == 2 && ((kR == 1 && kW == 8) || (kR == 2 && kW == 4) || (kT == 8 && kR == 1 && kW == 4));

struct TileConfig {
  int rows = 1;        // kR
  int depth = 2;       // kD
  int row_warps = 1;   // kRowWarps
  int splits = 0;      // K splits over the grid's z; 0: as many as fill the GPU (splits_for)
};

// The tile shape for M tokens against an [N, K] weight. Measured on an H100 (sweep of every
// compiled shape): one row tile up to 8 tokens (the decode is the cost, more rows only cut the
// CTA count); 2 or 4 row tiles at 9-64 tokens, where loading x for every 16 rows is the cost,
// 4 only while N / 64 still gives most SMs a CTA; a deeper load ring when K is long against N
// (fewer, longer rows: each warp has more steps to keep in flight).
// QLORA_KERNELS_MM_TILE="R,D" (or "R,D,W" / "R,D,W,S": W row groups per CTA, S K splits over
// the grid, at most 64; 0 or left out after W = enough to fill the GPU, left out after D = 1)
// overrides it, for tuning sweeps (a key not compiled for this many tokens falls back to the
// measured choice).
TileConfig tile_config(int64_t M, int64_t N, int64_t K, bool allow_override) {
  TileConfig c;
  const char* env = allow_override ? std::getenv("QLORA_KERNELS_MM_TILE") : nullptr;
  if (env != nullptr && *env != '\0') {
    const int n = std::sscanf(env, "%d,%d,%d,%d", &c.rows, &c.depth, &c.row_warps, &c.splits);
    TORCH_CHECK(n >= 2 && c.splits >= 0, "QLORA_KERNELS_MM_TILE: expected \"R,D\" or \"R,D,W[,S]\", got \"", env,
                "\"");
    // "R,D": the K split inside the CTA alone, as before W and S; "R,D,W": S automatic
    if (n == 2) c.splits = 1;
    c.splits = std::min(c.splits, 64);  // as splits_for: beyond that only the workspace grows
    return c;
  }
  c.depth = K >= 2 * N ? 4 : 2;
  c.splits = 1;
  if (M > 8 && M <= 16) {
    c.rows = N >= 5120 ? 4 : 2;
    if (c.rows == 4) c.depth = 2;
  } else if (M > 16) {
    // 17-64 tokens: 2 row tiles (at 33-64 it has 255 registers and spills a little, but halving
    // x's loads per weight byte won: 22016 x 8192 at 64 tokens 217 -> 178 us, H100)
    c.rows = 2;
    c.depth = 2;
  }
  return c;
}

// K splits for a launch of `ctas` CTAs (tiles x token tiles) whose warps walk K in
// slices of kSlices: enough for about two CTAs per SM, but at least 2 steps per warp per split.
inline int splits_for(int64_t ctas, int nsteps, int slices, int device) {
  const int64_t want = ceil_div(2 * int64_t{multiprocessor_count(device)}, ctas);
  const int64_t most = std::max<int64_t>(1, nsteps / (2 * slices));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, most, 64})));
}

// x as the kernel for kT n-tiles reads it, and its row stride: permuted by permute_x_kernel
// (kPermuteX), or x itself. Done once per call, for all the weights it launches.
template <typename T, int kT>
std::pair<at::Tensor, int64_t> kernel_x(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  if constexpr (!kPermuteX<kT>) {
    return {x, K};
  } else {
    const int64_t x_stride = ceil_div(K, kStepK) * kStepK;
    at::Tensor xp = at::empty({M, x_stride}, x.options());
    const int64_t units = M * x_stride / 8;
    launch_pdl(permute_x_kernel<T>, dim3(static_cast<unsigned>(std::min<int64_t>(ceil_div(units, 256), 2048))),
               dim3(256), 0, x.get_device(), reinterpret_cast<const T*>(x.data_ptr()),
               reinterpret_cast<T*>(xp.data_ptr()), M, static_cast<int>(K), x_stride);
    return {xp, x_stride};
  }
}

// out of weights[0] = the K splits' partial tiles summed (+ bias), after a launch that split K.
// After_rows: the launch was the rows kernel, which lets this one launch once all its CTAs are past
// their main loop; then this one overlaps it (programmatic dependent launch) even with PDL off,
// its one predecessor being ours (QLORA_KERNELS_MM_SUM_PDL=0 turns that off, for comparisons).
template <typename T>
void sum_k_splits(const at::Tensor& partial, int splits, int M, const WeightSet<T>& weights, int device,
                  bool after_rows = false) {
  const int64_t mn = int64_t{M} * weights.N[0];
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(mn, threads), 4096));
  const bool overlap = pdl_enabled(device) || (after_rows && env_flag("QLORA_KERNELS_MM_SUM_PDL", true));
  launch_pdl_if(overlap, sum_k_splits_kernel<T>, dim3(blocks), dim3(threads), 0, device,
             static_cast<const float*>(partial.data_ptr<float>()), splits, mn, weights.N[0], weights.bias[0],
             weights.out[0]);
}

// xp, x_stride: from kernel_x<T, kT>.
template <typename T, int kT, int kR, int kD, bool kGrouped, int kW>
void launch_matmul_4bit(const at::Tensor& xp, int64_t x_stride, const WeightSet<T>& weights, int total_tiles,
                        const float* nested_code, int M, int K, int lg_bs, int lg_nbs, QuantType qt,
                        bool nested, int splits) {
  const int64_t token_tiles = ceil_div(M, kT * 8);
  TORCH_CHECK(token_tiles <= 65535, "x: expected at most ", num(65535 * kT * 8), " rows, got ", num(M));
  const int nsteps = static_cast<int>(ceil_div(K, kStepK));
  if (splits <= 0) splits = splits_for(int64_t{total_tiles} * token_tiles, nsteps, kMmWarps / kW, xp.get_device());
  const int split_steps = static_cast<int>(ceil_div(nsteps, std::min(splits, nsteps)));
  splits = static_cast<int>(ceil_div(nsteps, split_steps));  // no empty split
  TORCH_CHECK(!kGrouped || splits == 1, "matmul_4bit: a grouped launch with K splits (an internal error)");
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, M, weights.N[0]}, xp.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(total_tiles), static_cast<unsigned>(token_tiles), static_cast<unsigned>(splits));
  const int device = xp.get_device();
  launch_pdl(matmul_4bit_kernel<T, kT, kR, kD, kGrouped, kW>, grid, dim3(kMmThreads), 0, device,
             reinterpret_cast<const T*>(xp.data_ptr()), weights, nested_code, M, K, lg_bs, lg_nbs,
             static_cast<int>(qt), nested, split_steps, splits > 1 ? partial.data_ptr<float>() : nullptr, x_stride);
  if (splits > 1) sum_k_splits(partial, splits, M, weights, device);
}

// Launches the bulk-copy kernel if this device and this build can run it: compute capability 9.0
// or newer, and the kernel compiled for it (a build for 8.x only JIT-compiles its empty body on an
// H100: ptxVersion < 90). Returns false, launching nothing, otherwise. Checked once per device,
// with the number of CTAs that fit on an SM (the persistent grid's size).

// The persistent grid is as many CTAs as fit on the GPU, each taking row tiles in turn. A launch
// with a few more tiles than that (3 CTAs per SM on an H100) leaves a second round for some CTAs
// that the others wait on: 8192 x 8192 (512 tiles, 396 CTAs) at one token 23.5 us. The kDense
// build of the kernel fits 4 CTAs per SM (528: one round), at 21.5 us (6656 x 6656, 416 tiles:
// 18.5 -> 18.0). It runs for such launches only, at 1-4 tokens: elsewhere its spills and tighter
// register budget cost up to 13% (13824 x 5120, 864 tiles: 22.1 -> 24.9 us; 6656 x 6656 at 8
// tokens 21.7 -> 24.3). A tile's sums do not depend on the grid, so both give the same bits.
// (H100, experiments/matmul_4bit_decode_ablations_stop23.txt.)
template <typename T, int kT, int kR, int kStages, bool kGrouped>
bool launch_matmul_4bit_bulk(const at::Tensor& x, const WeightSet<T>& weights, int total_tiles, const float* nested_code,
                             int M, int K, int lg_bs, int lg_nbs, QuantType qt, bool nested) {
  auto* kernel = matmul_4bit_bulk_kernel<T, kT, kR, kStages, kGrouped>;
  constexpr int kSmem = bulk_smem_bytes<kT, kR, kStages>();
  const int device = x.get_device();
  int per_sm = sm90_ctas_per_sm(reinterpret_cast<const void*>(kernel), kBulkThreads, kSmem, device);
  if (per_sm <= 0) return false;
  const int64_t sms = multiprocessor_count(device);
  if (M <= 4 && total_tiles > per_sm * sms) {
    auto* dense = matmul_4bit_bulk_kernel<T, kT, kR, kStages, kGrouped, true>;
    const int dense_per_sm = sm90_ctas_per_sm(reinterpret_cast<const void*>(dense), kBulkThreads, kSmem, device);
    if (dense_per_sm > per_sm && total_tiles <= dense_per_sm * sms) {
      kernel = dense;
      per_sm = dense_per_sm;
    }
  }
  const int64_t token_tiles = ceil_div(M, kT * 8);
  TORCH_CHECK(token_tiles <= 65535, "x: expected at most ", num(65535 * kT * 8), " rows, got ", num(M));
  const int64_t ctas = std::min<int64_t>(total_tiles, per_sm * sms);
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(token_tiles), 1);
  launch_pdl(kernel, grid, dim3(kBulkThreads), kSmem, device, reinterpret_cast<const T*>(x.data_ptr()), weights,
             total_tiles, nested_code, M, K, lg_bs, lg_nbs, static_cast<int>(qt), nested);
  return true;
}

// Whether the bulk-copy kernel serves M tokens (on sm_90 and up): at 1-8, where the rows kernel
// does not take the layer (rows_config: the largest layers and down projections). (At 9-16 it was tried
// with one and two row tiles per CTA and lost to the register kernel's four on most LLaMA shapes,
// H100.) QLORA_KERNELS_MM_BULK=0 turns it off, for comparisons; so does QLORA_KERNELS_MM_TILE (a
// tuning sweep of the register kernel).
bool bulk_wanted(int64_t M) {
  if (M > 8) return false;
  const char* tile = std::getenv("QLORA_KERNELS_MM_TILE");
  if (tile != nullptr && *tile != '\0') return false;
  return env_flag("QLORA_KERNELS_MM_BULK", true);
}

// The rows kernel's configuration: kR row tiles per warp, kStages stages, K splits over the grid
// (0: rows_splits). Measured on an H100 over the LLaMA shapes at 9, 16, 32 and 64 tokens (every
// R, S pair, results/.../experiments/matmul_4bit_rows_sweep.txt; 1-8 tokens:
// matmul_4bit_rows_1_8_tokens_vs_bulk.json):
// * 2 row tiles per warp (256 rows per CTA: x's shared-memory reads and the absmax loads shared
//   by twice the rows) won on the larger layers: from 8192 x 8192 up at 9-16 tokens, above
//   5120 x 5120 at 17-64; one row tile kept more CTAs on the smaller ones;
// * 2 stages were within a few percent of 4 everywhere, and left room for 2 CTAs per SM;
// * at 9-32 tokens the register kernel stays faster on layers smaller than 4096 x 4096 (few row
//   tiles). On 4096 x 4096 it was faster with PDL on (at 9 tokens 10.7 us against 12.6 for the
//   rows kernel's best K split; experiments/matmul_4bit_rows_sweep_pdl.txt), but with PDL off,
//   the default, the rows kernel with 8 K splits is (stop 22: 10.8-10.9 us against 11.4-11.9 at
//   9-16 tokens, 12.4-12.8 against 13.5-14.4 at 24-32);
// * at 1-8 tokens (one n-tile) it beat the bulk kernel on the largest layers: 8192 x 22016 at one
//   token 45.2 against 52.4 us, at 8 tokens 45.9 against 66.2; 28672 x 8192 59.9 against 61.8
//   and 62.4 against 81.0. The bulk kernel stayed faster below about 8192 x 8192 (at 5-8 tokens)
//   and 150 M weights (at 1-4: 13824 x 5120 at one token 20.1 against 23.3 us). Stop 22 (x by
//   tensor copy since): also on down projections (K >= 2 N) of more than 4096 rows, 6656 x 17920
//   at one token 36.0 against 44.1 us; on 4096 rows the bulk kernel stays faster (4096 x 11008
//   16.3 against 20.1). Mid-size layers (6656 x 6656, 8192 x 8192) are faster alone in the rows
//   kernel too, but grouped in the bulk kernel (below); matmul_4bit_rows_1_8_tokens_stop22.json
//   and matmul_4bit_grouped_bulk_vs_rows_stop22.txt.
// QLORA_KERNELS_MM_ROWS="R,S[,splits]" overrides it (for tuning sweeps; 0 splits: rows_splits);
// QLORA_KERNELS_MM_ROWS=0 turns the kernel off, and so does QLORA_KERNELS_MM_TILE.
struct RowsConfig {
  bool on = true;
  int rows = 1, stages = 2, splits = 0;
};

RowsConfig rows_config(int64_t M, int64_t N, int64_t K) {
  RowsConfig c;
  const int64_t size = N * K;
  if (M <= 8) {
    // 1-8 tokens: the largest layers, and the long rows of a down projection; else the bulk
    // kernel (its 16-row tiles keep every SM busy on small layers: 4096 x 4096 at one token 8.1
    // us against 10.7 here). A weight takes the same kernel alone and in a group (see
    // run_matmul_4bit), and a group is one launch only in the bulk kernel, which is why layers
    // that are grouped (q/k/v, gate/up) keep it even where the rows kernel is faster alone:
    // 6656 x 6656 at one token 17.3 us against 18.9 alone, but 3 x 6656 x 6656 49.3 against
    // 38.2 for the bulk kernel's one launch (8192 x 8192: 23.1 against 24.5 alone, 3 x 64.9
    // against 53.0).
    c.on = size >= (M <= 4 ? int64_t{150} << 20 : int64_t{8192} * 8192) || (N > 4096 && K >= 2 * N);
    c.rows = 2;
  } else {
    // Layers of at most 4096 rows (from 4096 x 4096 weights) at 9-32 tokens, with one row tile:
    // 8 K splits, more than rows_splits gives them (its model has each CTA slot's rounds run
    // back to back, and a second round of shorter CTAs measured faster). H100 (stop 22,
    // matmul_4bit_rows_splits_9_32_tokens_stop22.json): 4096 x 11008 at 16 tokens 18.7 us
    // against 21.7, 4096 x 4096 10.9 against 11.9 (the register kernel), at 32 12.8 against 14.4.
    const bool narrow = M <= 32 && N <= 4096 && size >= int64_t{4096} * 4096;
    c.on = M <= 64 && (M > 32 || size > int64_t{4096} * 4096 || narrow);
    c.rows = size >= (M <= 16 ? int64_t{8192} * 8192 : int64_t{5120} * 5120 + 1) ? 2 : 1;
    if (narrow && c.rows == 1) c.splits = 8;
  }
  const char* tile = std::getenv("QLORA_KERNELS_MM_TILE");
  if (tile != nullptr && *tile != '\0') c.on = false;
  const char* env = std::getenv("QLORA_KERNELS_MM_ROWS");
  if (env != nullptr && *env != '\0') {
    if (std::strcmp(env, "0") == 0) {
      c.on = false;
    } else {
      c.splits = 0;
      const int n = std::sscanf(env, "%d,%d,%d", &c.rows, &c.stages, &c.splits);
      TORCH_CHECK(n >= 2 && c.splits >= 0, "QLORA_KERNELS_MM_ROWS: expected \"R,S\" or \"R,S,splits\" or 0, got \"",
                  env, "\"");
      TORCH_CHECK((c.rows == 1 || c.rows == 2) && (c.stages == 2 || c.stages == 4),
                  "QLORA_KERNELS_MM_ROWS: row tiles R must be 1 or 2 and stages S 2 or 4 (the compiled ones), got \"",
                  env, "\"");
      c.on = M <= 64;
    }
  }
  return c;
}

// K splits for `ctas` CTAs of `rows` weight rows each when `slots` fit on the GPU at once. A
// model in bytes: the weight bytes the GPU could have moved in the rounds it takes
// (ceil(ctas * s / slots) rounds of 1 / s of each tile), plus, with splits, the float32 partial
// tiles written and read back and the summing launch (about 2 us: 6 MB at copy bandwidth).
// Rounds alone split 28672 x 8192 at 32-64 tokens 7 ways, and ran 40% slower than no split
// (the partial tiles' 100 MB); 4096 x 4096 at 64 tokens still splits 4 ways (34 -> 17 us).
inline int rows_splits(int64_t ctas, int64_t slots, int nsteps, int64_t rows, int64_t K, int64_t M, int64_t N) {
  const int most = std::max(1, std::min(64, nsteps / 8));  // each split keeps at least 8 steps
  int best = 1;
  double best_bytes = 0;
  for (int s = 1; s <= most; ++s) {
    double bytes = static_cast<double>(ceil_div(ctas * s, slots)) * slots * rows * (K / 2) / s;
    if (s > 1) bytes += 8.0 * s * M * N + 6e6;
    if (s == 1 || bytes < best_bytes) {
      best = s;
      best_bytes = bytes;
    }
  }
  return best;
}

// Launches the rows kernel for one weight if this device, driver and build can run it (as the
// bulk kernel); returns false, launching nothing, otherwise.
template <typename T, int kT, int kR, int kStages>
bool launch_matmul_4bit_rows(const at::Tensor& x, const WeightSet<T>& weights, const float* nested_code, int M,
                             int K, int lg_bs, int lg_nbs, QuantType qt, bool nested, int splits) {
  auto* kernel = matmul_4bit_rows_kernel<T, kT, kR, kStages>;
  constexpr int kSmem = rows_smem_bytes<kT, kR, kStages>();
  constexpr int kRows = kMmWarps * kTileRows * kR;
  const int device = x.get_device();
  const int per_sm = sm90_ctas_per_sm(reinterpret_cast<const void*>(kernel), kBulkThreads, kSmem, device);
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (per_sm <= 0 || encode == nullptr) return false;
  // The weight as a 2-D tensor of bytes [N, K / 2], read in boxes of kRows rows x one step's bytes.
  const CUtensorMap w_map = tensor_map<2>(
      encode, CU_TENSOR_MAP_DATA_TYPE_UINT8, weights.packed[0],
      {static_cast<cuuint64_t>(K / 2), static_cast<cuuint64_t>(weights.N[0])}, {static_cast<cuuint64_t>(K / 2)},
      {kRowsStepBytes, kRows}, CU_TENSOR_MAP_SWIZZLE_NONE, "a weight", weights.N[0], K);
  // x [M, K] as [M][K / 32][32] 16-bit elements (K % 32 == 0), read in boxes of the token tile's
  // tokens x a step's 4 runs x 32, in the 64-byte swizzle the kernel reads it in.
  const CUtensorMap x_map = tensor_map<3>(
      encode, CU_TENSOR_MAP_DATA_TYPE_UINT16, x.data_ptr(),
      {32, static_cast<cuuint64_t>(K / 32), static_cast<cuuint64_t>(M)},
      {static_cast<cuuint64_t>(kXRunBytes), static_cast<cuuint64_t>(K) * 2}, {32, 4, kT * 8},
      CU_TENSOR_MAP_SWIZZLE_64B, "x", M, K);
  const int64_t tiles = ceil_div(weights.N[0], kRows);
  const int64_t token_tiles = ceil_div(M, kT * 8);
  TORCH_CHECK(token_tiles <= 65535 && tiles < (int64_t{1} << 31), "x: sizes out of range");
  const int nsteps = static_cast<int>(ceil_div(K, kStepK));
  if (splits <= 0)
    splits = rows_splits(tiles * token_tiles, int64_t{per_sm} * multiprocessor_count(device), nsteps, kRows, K, M,
                         weights.N[0]);
  const int split_steps = static_cast<int>(ceil_div(nsteps, std::min(splits, nsteps)));
  splits = static_cast<int>(ceil_div(nsteps, split_steps));  // no empty split
  at::Tensor partial;
  if (splits > 1) partial = at::empty({splits, M, weights.N[0]}, x.options().dtype(at::kFloat));
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(token_tiles), static_cast<unsigned>(splits));
  launch_pdl(kernel, grid, dim3(kBulkThreads), kSmem, device, x_map, w_map, weights, nested_code, M, K, lg_bs, lg_nbs,
             static_cast<int>(qt), nested, split_steps, splits > 1 ? partial.data_ptr<float>() : nullptr);
  if (splits > 1) sum_k_splits(partial, splits, M, weights, device, /*after_rows=*/true);
  return true;
}

// One weight of a launch, as the host has it.
struct HostWeight {
  at::Tensor packed, absmax;
  std::optional<at::Tensor> nested_absmax, offset, bias;
  int64_t N;
};

// "packed" for the single-weight op, "packed[2]" for the third weight of the grouped one.
std::string arg_name(const char* name, int index, bool grouped) {
  return grouped ? std::string(name) + "[" + std::to_string(index) + "]" : std::string(name);
}

// Checks x, every weight and the shared format, then runs the kernel once for all weights;
// returns one [M, N_i] output per weight.
std::vector<at::Tensor> run_matmul_4bit(const at::Tensor& x, const std::vector<HostWeight>& weights,
                                        int64_t blocksize, c10::string_view quant_type,
                                        const std::optional<at::Tensor>& nested_code,
                                        int64_t nested_blocksize, bool grouped) {
  check_cuda(x, "x");
  check_contiguous(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [M, K], got sizes ", dims(x.sizes()));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "x: expected dtype bfloat16 or float16, got ", x.scalar_type());
  const int64_t M = x.size(0);
  const int64_t K = x.size(1);
  TORCH_CHECK(K % 32 == 0 && K > 0, "x: the fused 4-bit matmul needs K (x.size(1)) a positive multiple "
              "of 32, got ", num(K), " (qlora_kernels.matmul_4bit takes the dequantize path then)");
  TORCH_CHECK(is_aligned16(x.data_ptr()), "x: expected a tensor starting on a 16-byte boundary");
  TORCH_CHECK(M < (int64_t{1} << 31) && K <= std::numeric_limits<int>::max() - kStepK, "x: sizes out of range");
  TORCH_CHECK(!weights.empty() && weights.size() <= static_cast<size_t>(kMaxWeights),
              "packed: expected 1 to ", num(kMaxWeights), " weights, got ", num(static_cast<int64_t>(weights.size())));
  const int lg_bs = log2_blocksize(blocksize, "blocksize");
  const QuantType qt = parse_quant_type(quant_type);
  const bool nested = weights[0].nested_absmax.has_value();
  TORCH_CHECK(nested_code.has_value() == nested, "nested_absmax, nested_code, offset: expected all three "
              "(double quant) or none");
  int lg_nbs = 0;
  if (nested) {
    lg_nbs = log2_blocksize(nested_blocksize, "nested_blocksize");
    check_operand(*nested_code, "nested_code", x, "x");
    check_dtype(*nested_code, "nested_code", at::kFloat);
    check_numel(*nested_code, "nested_code", 256, "the 8-bit code");
  }
  int64_t total_rows = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const HostWeight& w = weights[i];
    const int idx = static_cast<int>(i);
    const std::string packed_name = arg_name("packed", idx, grouped), absmax_name = arg_name("absmax", idx, grouped);
    const int64_t N = w.N;
    check_operand(w.packed, packed_name.c_str(), x, "x");
    check_dtype(w.packed, packed_name.c_str(), at::kByte);
    TORCH_CHECK(is_aligned16(w.packed.data_ptr()), packed_name, ": expected a tensor starting on a 16-byte boundary");
    check_operand(w.absmax, absmax_name.c_str(), x, "x");
    TORCH_CHECK(N > 0, arg_name("N", idx, grouped), ": expected > 0, got ", num(N));
    TORCH_CHECK(N * K < (int64_t{1} << 40) && N < (int64_t{1} << 31), "x, ", arg_name("N", idx, grouped),
                ": sizes out of range");
    const int64_t nblocks = ceil_div(N * K, blocksize);
    TORCH_CHECK(nblocks < (int64_t{1} << 31), arg_name("N", idx, grouped), ", blocksize: more than 2^31 absmax blocks (",
                num(nblocks), "); the fused kernel indexes them in 31 bits");
    check_numel(w.packed, packed_name.c_str(), N * K / 2, "N * K / 2 bytes");
    check_numel(w.absmax, absmax_name.c_str(), nblocks, "ceil(N * K / blocksize)");
    TORCH_CHECK(w.nested_absmax.has_value() == nested && w.offset.has_value() == nested,
                "nested_absmax, nested_code, offset: expected all three (double quant) or none",
                grouped ? " for every weight" : "");
    if (nested) {
      const std::string na_name = arg_name("nested_absmax", idx, grouped), off_name = arg_name("offset", idx, grouped);
      check_dtype(w.absmax, absmax_name.c_str(), at::kByte);
      check_operand(*w.nested_absmax, na_name.c_str(), x, "x");
      check_dtype(*w.nested_absmax, na_name.c_str(), at::kFloat);
      check_numel(*w.nested_absmax, na_name.c_str(), ceil_div(nblocks, nested_blocksize),
                  "ceil(absmax.numel() / nested_blocksize)");
      check_operand(*w.offset, off_name.c_str(), x, "x");
      check_dtype(*w.offset, off_name.c_str(), at::kFloat);
      check_numel(*w.offset, off_name.c_str(), 1, "a scalar");
    } else {
      check_dtype(w.absmax, absmax_name.c_str(), at::kFloat);
    }
    if (w.bias.has_value()) {
      const std::string bias_name = arg_name("bias", idx, grouped);
      check_operand(*w.bias, bias_name.c_str(), x, "x");
      TORCH_CHECK(w.bias->scalar_type() == x.scalar_type(), bias_name, ": expected dtype ", x.scalar_type(),
                  " (x's), got ", w.bias->scalar_type());
      check_numel(*w.bias, bias_name.c_str(), N, "N");
    }
    total_rows += N;
  }

  if (grouped && weights.size() > 1) {
    // A weight in a group gets the kernel and configuration it gets alone, so the same bits. The
    // grouped kernels serve decode batches (up to 8 tokens); beyond, each weight is its own call.
    // At 1-8 tokens on sm_90 so is each weight the rows kernel takes alone (rows_config: the
    // rows kernel runs one weight a launch); the others stay one launch of the bulk kernel. So is
    // a weight that a QLORA_KERNELS_MM_TILE override gives K splits over the grid (the grouped
    // register kernel runs without).
    const bool rows_kernel = M <= 8 && compute_capability_major(x.get_device()) >= 9;
    std::vector<size_t> alone, together_at;
    for (size_t i = 0; i < weights.size(); ++i) {
      const bool own_call = M > 8 || (rows_kernel && rows_config(M, weights[i].N, K).on) ||
                            tile_config(M, weights[i].N, K, /*allow_override=*/true).splits != 1;
      (own_call ? alone : together_at).push_back(i);
    }
    if (!alone.empty()) {
      auto call = [&](const std::vector<HostWeight>& ws) {
        return run_matmul_4bit(x, ws, blocksize, quant_type, nested_code, nested_blocksize, ws.size() > 1);
      };
      std::vector<at::Tensor> outs(weights.size());
      for (size_t i : alone) outs[i] = call({weights[i]})[0];
      if (!together_at.empty()) {
        std::vector<HostWeight> together;
        for (size_t i : together_at) together.push_back(weights[i]);
        const std::vector<at::Tensor> rest = call(together);
        for (size_t j = 0; j < together_at.size(); ++j) outs[together_at[j]] = rest[j];
      }
      return outs;
    }
  }
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(compute_capability_major(x.get_device()) >= 8, "x: the fused 4-bit matmul needs a GPU of compute capability 8.0 or newer "
              "(bf16/fp16 tensor-core MMA); qlora_kernels.matmul_4bit takes the dequantize path on older GPUs");
  std::vector<at::Tensor> outs;
  for (const HostWeight& w : weights) outs.push_back(at::empty({M, w.N}, x.options()));
  if (M == 0) return outs;
  const float* nc = nested ? nested_code->data_ptr<float>() : nullptr;
  // The tile is chosen for all rows of the launch together: they share M and K, and the CTA
  // count is what the row count decides.
  const TileConfig wanted = tile_config(M, total_rows, K, /*allow_override=*/true);
  const TileConfig measured = tile_config(M, total_rows, K, /*allow_override=*/false);
  bool launched = false;
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int m = static_cast<int>(M), k = static_cast<int>(K);
    // Weights i0 .. i1 - 1 as one launch's WeightSet, and its row tiles of tile_rows rows.
    auto weight_set = [&](size_t i0, size_t i1, int tile_rows) {
      WeightSet<T> set{};
      int64_t tiles = 0;
      for (int j = 0; j < kMaxWeights; ++j) {
        set.tile_end[j] = std::numeric_limits<int>::max();
        if (i0 + j >= i1) continue;
        const HostWeight& w = weights[i0 + j];
        set.packed[j] = w.packed.data_ptr<uint8_t>();
        set.absmax[j] = w.absmax.data_ptr();
        set.nested_absmax[j] = nested ? w.nested_absmax->data_ptr<float>() : nullptr;
        set.offset[j] = nested ? w.offset->data_ptr<float>() : nullptr;
        set.bias[j] = w.bias.has_value() ? reinterpret_cast<const T*>(w.bias->data_ptr()) : nullptr;
        set.out[j] = reinterpret_cast<T*>(outs[i0 + j].data_ptr());
        set.N[j] = static_cast<int>(w.N);
        tiles += ceil_div(w.N, tile_rows);
        TORCH_CHECK(tiles < (int64_t{1} << 31), "N: too many row tiles");
        set.tile_end[j] = static_cast<int>(tiles);
      }
      return std::pair<WeightSet<T>, int64_t>{set, tiles};
    };
    // sm_90, 1-8 tokens: the bulk-copy kernel, all weights in one launch (up to kMaxWeights).
    auto try_bulk = [&]() {
      auto launch_all = [&](auto grouped) {
        constexpr bool kGrouped = decltype(grouped)::value;
        for (size_t i = 0; i < weights.size(); i += kGrouped ? weights.size() : 1) {
          const size_t i1 = kGrouped ? weights.size() : i + 1;
          const auto [set, tiles] = weight_set(i, i1, kTileRows);
          if (!launch_matmul_4bit_bulk<T, 1, 1, kBulkStages, kGrouped>(x, set, static_cast<int>(tiles), nc, m, k,
                                                                       lg_bs, lg_nbs, qt, nested))
            return false;  // only the first launch can refuse: the check is per device
        }
        return true;
      };
      return weights.size() > 1 ? launch_all(std::true_type{}) : launch_all(std::false_type{});
    };
    // sm_90, 9-64 tokens (1-8 on the layers rows_config names): the rows kernel, one launch per
    // weight. (A group reaches here only with the rows kernel off for all its weights on sm_90:
    // run_matmul_4bit split off the others.)
    const RowsConfig rows = rows_config(M, weights[0].N, K);
    if (bulk_wanted(M) && !rows.on) launched = try_bulk();
    if (launched) return;
    auto try_rows = [&](auto tokens) {
      constexpr int kT = decltype(tokens)::value;
      for (size_t i = 0; i < weights.size(); ++i) {
        const auto [set, tiles] = weight_set(i, i + 1, kTileRows);
        (void)tiles;
        auto go = [&](auto r, auto st) {
          return launch_matmul_4bit_rows<T, kT, decltype(r)::value, decltype(st)::value>(
              x, set, nc, m, k, lg_bs, lg_nbs, qt, nested, rows.splits);
        };
        using I1 = std::integral_constant<int, 1>;
        using I2 = std::integral_constant<int, 2>;
        using I4 = std::integral_constant<int, 4>;
        const bool ok = rows.rows == 2 ? (rows.stages == 2 ? go(I2{}, I2{}) : go(I2{}, I4{}))
                                       : (rows.stages == 2 ? go(I1{}, I2{}) : go(I1{}, I4{}));
        if (!ok) return false;  // only the first launch can refuse: the check is per device
      }
      return true;
    };
    if (rows.on) {
      if (M <= 8) {
        launched = try_rows(std::integral_constant<int, 1>{});
      } else if (M <= 16) {
        launched = try_rows(std::integral_constant<int, 2>{});
      } else if (M <= 32) {
        launched = try_rows(std::integral_constant<int, 4>{});
      } else {
        launched = try_rows(std::integral_constant<int, 8>{});
      }
    }
    if (launched) return;
    // Fewest n-tiles that hold M tokens (beyond 64 tokens, more CTAs along y), then the compiled
    // (kR, kD) that tile_config asked for.
    auto with_tokens = [&](auto tokens) {
      constexpr int kT = decltype(tokens)::value;
      auto try_tile = [&](auto rows, auto depth, auto row_warps, const TileConfig& want) {
        constexpr int kR = decltype(rows)::value, kD = decltype(depth)::value, kW = decltype(row_warps)::value;
        if constexpr (kCompiled<kT, kR, kD, kW>) {
          if (!launched && want.rows == kR && want.depth == kD && want.row_warps == kW) {
            const auto [xp, x_stride] = kernel_x<T, kT>(x);
            // Weights i0 .. i1 - 1 in one launch.
            auto launch_weights = [&](auto grouped, size_t i0, size_t i1) {
              const auto [set, tiles] = weight_set(i0, i1, kTileRows * kR * kW);
              constexpr bool kGrouped = decltype(grouped)::value;  // only with kW == 1 (the kernel asserts it)
              launch_matmul_4bit<T, kT, kR, kD, kGrouped, kW>(xp, x_stride, set, static_cast<int>(tiles), nc, m, k,
                                                              lg_bs, lg_nbs, qt, nested, kGrouped ? 1 : want.splits);
            };
            // The one-launch kernel is compiled for decode batches (one n-tile, M <= 8) only:
            // above that, and for a single weight, one launch per weight of the plain kernel.
            bool done = false;
            if constexpr (kT == 1 && kW == 1) {
              if (weights.size() > 1) {
                launch_weights(std::true_type{}, 0, weights.size());
                done = true;
              }
            }
            for (size_t i = 0; !done && i < weights.size(); ++i) launch_weights(std::false_type{}, i, i + 1);
            launched = true;
          }
        }
      };
      using I1 = std::integral_constant<int, 1>;
      using I2 = std::integral_constant<int, 2>;
      using I4 = std::integral_constant<int, 4>;
      using I8 = std::integral_constant<int, 8>;
      for (const TileConfig& tile : {wanted, measured}) {
        // (R, D, W): the compiled ones (kCompiled)
        try_tile(I1{}, I2{}, I1{}, tile);
        try_tile(I1{}, I4{}, I1{}, tile);
        try_tile(I2{}, I2{}, I1{}, tile);
        try_tile(I2{}, I4{}, I1{}, tile);
        try_tile(I4{}, I2{}, I1{}, tile);
        try_tile(I1{}, I2{}, I8{}, tile);
        try_tile(I2{}, I2{}, I4{}, tile);
        try_tile(I1{}, I2{}, I4{}, tile);
      }
    };
    if (M <= 8) {
      with_tokens(std::integral_constant<int, 1>{});
    } else if (M <= 16) {
      with_tokens(std::integral_constant<int, 2>{});
    } else if (M <= 32) {
      with_tokens(std::integral_constant<int, 4>{});
    } else {
      with_tokens(std::integral_constant<int, 8>{});
    }
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(TypeTag<__nv_bfloat16>{});
  } else {
    run(TypeTag<__half>{});
  }
  TORCH_CHECK(launched, "matmul_4bit: no compiled tile for ", num(M), " tokens (an internal error)");
  return outs;
}

at::Tensor matmul_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                       int64_t blocksize, c10::string_view quant_type, int64_t N,
                       const std::optional<at::Tensor>& nested_absmax,
                       const std::optional<at::Tensor>& nested_code,
                       const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                       const std::optional<at::Tensor>& bias) {
  return run_matmul_4bit(x, {HostWeight{packed, absmax, nested_absmax, offset, bias, N}}, blocksize, quant_type,
                         nested_code, nested_blocksize, /*grouped=*/false)[0];
}

// Several weights [N_i, K] times the same x in one launch (see WeightSet): what
// qlora_kernels.nn.ProjectionGroup runs for q, k, v or gate, up at decode.
std::vector<at::Tensor> matmul_4bit_grouped(const at::Tensor& x, at::TensorList packed, at::TensorList absmax,
                                            int64_t blocksize, c10::string_view quant_type, at::IntArrayRef N,
                                            std::optional<at::TensorList> nested_absmax,
                                            const std::optional<at::Tensor>& nested_code,
                                            std::optional<at::TensorList> offset, int64_t nested_blocksize,
                                            const c10::List<std::optional<at::Tensor>>& bias) {
  const size_t count = packed.size();
  // (sizes through num(): streaming an integer from this library crashed the process on the H100
  // machine, see common.cuh)
  auto size = [](size_t n) { return num(static_cast<int64_t>(n)); };
  TORCH_CHECK(absmax.size() == count && N.size() == count, "packed, absmax, N: expected one of each per weight, got ",
              size(count), ", ", size(absmax.size()), ", ", size(N.size()));
  TORCH_CHECK(bias.size() == 0 || bias.size() == count, "bias: expected none or one (or None) per weight, got ",
              size(bias.size()));
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK(offset.has_value() == nested && nested_code.has_value() == nested,
              "nested_absmax, nested_code, offset: expected all three (double quant) or none");
  TORCH_CHECK(!nested || (nested_absmax->size() == count && offset->size() == count),
              "nested_absmax, offset: expected one per weight");
  std::vector<HostWeight> weights;
  for (size_t i = 0; i < count; ++i) {
    HostWeight w{packed[i], absmax[i], std::nullopt, std::nullopt, std::nullopt, N[i]};
    if (nested) {
      w.nested_absmax = (*nested_absmax)[i];
      w.offset = (*offset)[i];
    }
    if (bias.size() > 0) w.bias = bias.get(i);
    weights.push_back(w);
  }
  return run_matmul_4bit(x, weights, blocksize, quant_type, nested_code, nested_blocksize, /*grouped=*/true);
}

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("matmul_4bit", &qlora_kernels::matmul_4bit);
  m.impl("matmul_4bit_grouped", &qlora_kernels::matmul_4bit_grouped);
}
