// 4-bit blockwise quantization (NF4 / FP4, bitsandbytes' format) and its dequantization,
// optionally fused with the decoding of double-quantized (8-bit) absmax.
// Bit-exact with qlora_kernels/reference.py; see common.cuh for the rules that keep it so.
#include <torch/library.h>

#include <cfloat>

#include "common.cuh"
#include "quant_4bit.h"

namespace qlora_kernels {
namespace {

// =============================================================================================
// quantize_4bit
//
// One thread = 8 consecutive elements (one 16-byte load of bf16/fp16, two of fp32) -> 4 packed
// bytes (one 32-bit store). A CTA of 512 threads covers a tile of 4096 elements, the largest
// blocksize, so a quant block never straddles tiles: blocks of <= 256 elements reduce their
// absmax with warp shuffles over blocksize / 8 lanes, larger ones through shared memory.
// CTAs walk the tiles grid-stride, loading the next tile while encoding the current one.

constexpr int kQuantThreads = 512;
constexpr int kQuantWarps = kQuantThreads / 32;
constexpr int kQuantElems = 8;
constexpr int kQuantTile = kQuantThreads * kQuantElems;

// Fast NF4 encoder. The encoding is most of the kernel's instructions, so NF4 (the format that
// matters) gets a table lookup instead of a 15-way compare: bin k = round(32 * s) + 32 (0..64,
// s the scaled value) holds at most one threshold, because the NF4 thresholds are >= 0.08 apart
// and a bin is 1/32 wide. So position = (thresholds below the bin) + (s > the bin's threshold):
// one FFMA, one LEA, two LDS (65-word tables: bank conflicts only between bins 32 apart, rare),
// one compare: ~10 instructions per value instead of ~25. The FFMA computes s * 32 + 1.5 * 2^23
// + 32 exactly and rounds once onto the integer grid (the ulp in [2^23, 2^24) is 1), so its bit
// pattern minus that of 1.5 * 2^23 is k. A finite absmax bounds |s| by 1 + 2^-22, so k is
// always in 0..64. No threshold sits on a bin edge (k - 32 +- 0.5) / 32, so the rounding
// direction at an edge cannot matter. Checked for every float32 s in [-1 - 2^-20, 1 + 2^-20]
// against torch.bucketize. FP4 (three thresholds within +-0.0027) and blocks whose absmax is
// NaN / Inf use the binary search instead.
constexpr int kBins = 65;
constexpr float kBinMagic = 12582944.0f;      // 1.5 * 2^23 + 32
constexpr uint32_t kBinBase = 0x4b400000u;    // the bits of 1.5 * 2^23

// A thread's 8 input elements, as raw 32-bit words (two 16-bit elements per word).
template <typename T>
struct Group {
  static constexpr int kWords = kQuantElems * static_cast<int>(sizeof(T)) / 4;
  uint32_t w[kWords];
};

// The elements e0 .. e0 + 7 one by one: for the last, partial tile (past n they read as +0.0,
// bits 0: the reference's zero padding) and for an A that does not start on 16 bytes.
__device__ __forceinline__ Group<float> load_group_unaligned(const float* A, int64_t e0, int64_t n) {
  Group<float> g;
  const uint32_t* a = reinterpret_cast<const uint32_t*>(A);
#pragma unroll
  for (int i = 0; i < kQuantElems; ++i) g.w[i] = e0 + i < n ? a[e0 + i] : 0u;
  return g;
}

template <typename T>
__device__ __forceinline__ Group<T> load_group_unaligned(const T* A, int64_t e0, int64_t n) {
  Group<T> g;
  const uint16_t* a = reinterpret_cast<const uint16_t*>(A);
#pragma unroll
  for (int i = 0; i < kQuantElems; i += 2) {
    const uint32_t lo = e0 + i < n ? a[e0 + i] : 0u;
    const uint32_t hi = e0 + i + 1 < n ? a[e0 + i + 1] : 0u;
    g.w[i / 2] = lo | (hi << 16);
  }
  return g;
}

// The 8 elements of a full group at a 16-byte aligned address: 16-byte loads, evict-first
// (the weights are read once).
template <typename T>
__device__ __forceinline__ Group<T> load_group_vec(const T* __restrict__ A) {
  Group<T> g;
  const uint4* src = reinterpret_cast<const uint4*>(A);
#pragma unroll
  for (int c = 0; c < Group<T>::kWords / 4; ++c) {
    const uint4 u = __ldcs(src + c);
    g.w[4 * c] = u.x;
    g.w[4 * c + 1] = u.y;
    g.w[4 * c + 2] = u.z;
    g.w[4 * c + 3] = u.w;
  }
  return g;
}

// Element i of a group as float32 (exact for all three input types).
template <typename T>
__device__ __forceinline__ float group_element(const Group<T>& g, int i) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(g.w[i]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const uint32_t w = g.w[i / 2];
    return __uint_as_float((i & 1) ? (w & 0xffff0000u) : (w << 16));
  } else {
    const uint32_t w = g.w[i / 2];
    return __half2float(__ushort_as_half(static_cast<unsigned short>((i & 1) ? (w >> 16) : w)));
  }
}

// Position of s among the 15 ascending thresholds (count of t with !(s <= t)), by binary search
// over shared memory: 15 distinct words in 15 distinct banks, so never a bank conflict.
// Written as "not <=" so that NaN lands at position 15, as torch.bucketize puts it.
__device__ __forceinline__ uint32_t search_position(float s, const float* thr) {
  uint32_t p = (s <= thr[7]) ? 0u : 8u;
  p += (s <= thr[p + 3]) ? 0u : 4u;
  p += (s <= thr[p + 1]) ? 0u : 2u;
  p += (s <= thr[p]) ? 0u : 1u;
  return p;
}

// Bit offset of element i's code in the thread's 32-bit word: byte i / 2 (little-endian, so
// the lower address), element 2j in the high nibble, 2j + 1 in the low one.
__device__ __forceinline__ constexpr int nibble_shift(int i) { return 8 * (i / 2) + ((i & 1) ? 0 : 4); }

// kBlockLanes = min(blocksize, 256) / 8: the lanes that share a quant block's absmax, a
// template parameter so that the shuffle reduction is unrolled (3 levels for blocksize 64).
template <typename T, int kQT, int kBlockLanes>
__global__ void __launch_bounds__(kQuantThreads)
    quantize_4bit_kernel(const T* __restrict__ A, uint8_t* __restrict__ packed,
                         float* __restrict__ absmax, int64_t n, int lg_bs, bool vec) {
  __shared__ float s_thr[16];
  __shared__ uint32_t s_order[16];
  __shared__ uint32_t s_bin_pos[kBins];
  __shared__ float s_bin_thr[kBins];
  // Per-warp maxima of blocks > 256 elements; two copies, alternating by iteration, so one
  // barrier per tile suffices (a warp can only rewrite a copy after all warps read it).
  __shared__ float s_red[2][kQuantWarps];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  if (tid < 16) {
    s_thr[tid] = tid < 15 ? __uint_as_float(kThresholdBits[kQT][tid]) : INFINITY;
    s_order[tid] = kSortedOrder[kQT][tid];
  }
  if (kQT == kNF4 && tid < kBins) {
    // Bin tid spans scaled values [(2 tid - 65) / 64, (2 tid - 63) / 64] (exact in float32).
    const float lower_edge = static_cast<float>(2 * tid - 65) * (1.0f / 64.0f);
    uint32_t below = 0;
#pragma unroll
    for (int j = 0; j < 15; ++j) below += __uint_as_float(kThresholdBits[kNF4][j]) < lower_edge;
    s_bin_pos[tid] = below;
    s_bin_thr[tid] = below < 15 ? __uint_as_float(kThresholdBits[kNF4][below]) : INFINITY;
  }
  __syncthreads();

  // Tiles are counted in 32 bits (the host checks n < 2^31 tiles); element offsets in 64.
  const uint32_t ntiles = static_cast<uint32_t>(ceil_div(n, kQuantTile));
  const uint32_t nfull = static_cast<uint32_t>(n / kQuantTile);  // tiles wholly inside n
  const int64_t nbytes = (n + 1) >> 1;
  const int tile_offset = tid * kQuantElems;
  // The first thread of each quant block writes its absmax.
  const bool block_writer = (tile_offset & ((1 << lg_bs) - 1)) == 0;
  int parity = 0;

  // Software pipelining: the next tile's 16-byte loads are in flight while this one encodes.
  auto load = [&](uint32_t tile) {
    const int64_t e0 = static_cast<int64_t>(tile) * kQuantTile + tile_offset;
    return vec && tile < nfull ? load_group_vec(A + e0) : load_group_unaligned(A, e0, n);
  };
  Group<T> next = load(blockIdx.x);
  for (uint32_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x, parity ^= 1) {
    const Group<T> cur = next;
    if (tile + gridDim.x < ntiles) next = load(tile + gridDim.x);
    const int64_t e0 = static_cast<int64_t>(tile) * kQuantTile + tile_offset;

    float v[kQuantElems];
    float am = 0.0f;
#pragma unroll
    for (int i = 0; i < kQuantElems; ++i) {
      v[i] = group_element(cur, i);
      am = nan_max(am, fabsf(v[i]));
    }
    // Every lane of the warp takes part (lanes past n hold zeros), so the full mask is right;
    // quant blocks are aligned groups of kBlockLanes lanes, which xor offsets < kBlockLanes
    // never leave.
#pragma unroll
    for (int o = 1; o < kBlockLanes; o <<= 1) am = nan_max(am, __shfl_xor_sync(0xffffffffu, am, o));
    if (kBlockLanes == 32 && lg_bs > 8) {  // uniform over the CTA, so the barrier is safe
      const int block_warps = 1 << (lg_bs - 8);
      if (lane == 0) s_red[parity][warp] = am;
      __syncthreads();
      float m = lane < block_warps ? s_red[parity][(warp & ~(block_warps - 1)) + lane] : 0.0f;
      for (int o = 1; o < block_warps; o <<= 1) m = nan_max(m, __shfl_xor_sync(0xffffffffu, m, o));
      am = __shfl_sync(0xffffffffu, m, 0);
    }
    if (block_writer && (tile < nfull || e0 < n)) absmax[e0 >> lg_bs] = am;

    const float inv = inverse_absmax(am);
    uint32_t word = 0;
    if (kQT == kNF4 && am <= FLT_MAX) {
#pragma unroll
      for (int i = 0; i < kQuantElems; ++i) {
        const float s = __fmul_rn(v[i], inv);
        const uint32_t k = __float_as_uint(__fmaf_rn(s, 32.0f, kBinMagic)) - kBinBase;
        word += (s_bin_pos[k] + (s > s_bin_thr[k] ? 1u : 0u)) << nibble_shift(i);
      }
    } else {
#pragma unroll
      for (int i = 0; i < kQuantElems; ++i) {
        const uint32_t pos = search_position(__fmul_rn(v[i], inv), s_thr);
        word += (kQT == kNF4 ? pos : s_order[pos]) << nibble_shift(i);
      }
    }

    // 4 packed bytes per thread, one 32-bit store (the output is ours, so aligned). Past n the
    // elements were encoded as zeros, which is what the last byte of an odd n must hold.
    const int64_t byte0 = e0 >> 1;
    if (tile < nfull) {
      *reinterpret_cast<uint32_t*>(packed + byte0) = word;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (byte0 + j < nbytes) packed[byte0 + j] = static_cast<uint8_t>(word >> (8 * j));
    }
  }
}

template <typename T, int kQT, int kBlockLanes>
void launch_quantize_4bit(const at::Tensor& A, at::Tensor& packed, at::Tensor& absmax,
                          int lg_bs) {
  const int64_t n = A.numel();
  auto kernel = quantize_4bit_kernel<T, kQT, kBlockLanes>;
  const int grid = grid_size(kernel, kQuantThreads, ceil_div(n, kQuantTile));
  // 16-byte loads need a 16-byte aligned A (a view may start anywhere).
  const bool vec = is_aligned16(A.data_ptr());
  kernel<<<grid, kQuantThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(A.data_ptr()), packed.data_ptr<uint8_t>(),
      absmax.data_ptr<float>(), n, lg_bs, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int kQT>
void dispatch_block_lanes(const at::Tensor& A, at::Tensor& packed, at::Tensor& absmax,
                          int lg_bs) {
  switch (lg_bs) {
    case 5:
      return launch_quantize_4bit<T, kQT, 4>(A, packed, absmax, lg_bs);
    case 6:
      return launch_quantize_4bit<T, kQT, 8>(A, packed, absmax, lg_bs);
    case 7:
      return launch_quantize_4bit<T, kQT, 16>(A, packed, absmax, lg_bs);
    default:
      return launch_quantize_4bit<T, kQT, 32>(A, packed, absmax, lg_bs);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit(const at::Tensor& A, int64_t blocksize,
                                                 c10::string_view quant_type) {
  check_cuda(A, "A");
  check_contiguous(A, "A");
  const int lg_bs = log2_blocksize(blocksize, "blocksize");
  const QuantType qt = parse_quant_type(quant_type);
  const c10::cuda::CUDAGuard guard(A.device());

  const int64_t n = A.numel();
  TORCH_CHECK(ceil_div(n, kQuantTile) <= int64_t{0x7fffffff}, "A: expected fewer than 2^31 * ",
              num(kQuantTile), " elements, got ", num(n));
  at::Tensor packed = at::empty({(n + 1) / 2, 1}, A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, A.options().dtype(at::kFloat));
  dispatch_float(A.scalar_type(), "A", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (n == 0) return;
    if (qt == kNF4) {
      dispatch_block_lanes<T, kNF4>(A, packed, absmax, lg_bs);
    } else {
      dispatch_block_lanes<T, kFP4>(A, packed, absmax, lg_bs);
    }
  });
  return {packed, absmax};
}

// =============================================================================================
// dequantize_4bit
//
// One warp = a tile of 1024 elements = 512 packed bytes, one 16-byte load per lane (one
// LDG.128 per 32 nibbles). The output is ~80% of the traffic, so its stores must coalesce
// perfectly: the warp stages its 512 bytes in shared memory and lane L then decodes chunk
// c * 32 + L (8 elements for 16-bit outputs, 4 for fp32) for c = 0..3 (0..7), so every 16-byte
// store instruction writes 512 contiguous bytes. The absmax of the tile's blocks (1024 /
// blocksize of them, at most 32) are decoded once, one block per lane, and handed to the lanes
// that need them with a shuffle. A tile that runs past numel takes a scalar path.

constexpr int kDequantThreads = 256;
constexpr int kDequantWarps = kDequantThreads / 32;
constexpr int kDequantTile = 1024;

// The absmax of quant block blk: a float32, or with double quant code8[q] * nested + offset
// (a multiply, then an add: two roundings, as the reference, never an FMA).
template <bool kNested>
__device__ __forceinline__ float block_absmax(const void* __restrict__ absmax, int64_t blk,
                                              const float* s_code8,
                                              const float* __restrict__ nested_absmax,
                                              float offset, int lg_nbs) {
  if constexpr (kNested) {
    const int q = __ldg(static_cast<const uint8_t*>(absmax) + blk);
    return __fadd_rn(__fmul_rn(s_code8[q], __ldg(nested_absmax + (blk >> lg_nbs))), offset);
  } else {
    return __ldg(static_cast<const float*>(absmax) + blk);
  }
}

// One 16-byte store of 8 (16-bit types) or 4 (fp32) values. A plain store: streaming
// (evict-first, __stcs) stores made no measurable difference on an H100, and the caller (a
// matmul) usually reads the output next, so it may as well stay in L2.
template <typename OutT>
__device__ __forceinline__ void store16(OutT* dst, const float* v) {
  uint4 u;
  if constexpr (sizeof(OutT) == 4) {
    u = make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                   __float_as_uint(v[3]));
  } else {
    u = make_uint4(pack2<OutT>(v[0], v[1]), pack2<OutT>(v[2], v[3]), pack2<OutT>(v[4], v[5]),
                   pack2<OutT>(v[6], v[7]));
  }
  *reinterpret_cast<uint4*>(dst) = u;
}

template <typename OutT, bool kNested>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize_4bit_kernel(const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                           const float* __restrict__ nested_absmax,
                           const float* __restrict__ nested_code,
                           const float* __restrict__ offset, OutT* __restrict__ out,
                           int64_t numel, int lg_bs, int lg_nbs, int quant_type, bool aligned) {
  // Elements per 16-byte store, and stores per lane and tile.
  constexpr int kEps = 16 / static_cast<int>(sizeof(OutT));
  constexpr int kChunks = kDequantTile / 32 / kEps;

  __shared__ float s_code8[kNested ? 256 : 1];
  __shared__ uint4 s_stage[kDequantWarps][32];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  if constexpr (kNested) {
    for (int i = tid; i < 256; i += kDequantThreads) s_code8[i] = nested_code[i];
    __syncthreads();
  }

  // The code table is read with a shuffle: lane i holds value i & 15, and a lane asks for the
  // lane its nibble names. shfl uses only bits 0..4 of the source lane (PTX: b[4:0]), so the
  // nibble can be passed with the other bytes still above it: no mask, one SHF at most per value.
  const float table_lane = __uint_as_float(kCodeValueBits[quant_type][lane & 15]);
  // The offset is a device tensor: read here, so the host never syncs on it.
  const float off = kNested ? __ldg(offset) : 0.0f;
  const int64_t nblocks = ((numel - 1) >> lg_bs) + 1;
  // Tiles are counted in 32 bits (the host checks numel < 2^31 tiles); element offsets in 64.
  const uint32_t ntiles = static_cast<uint32_t>(ceil_div(numel, kDequantTile));
  const uint32_t nfull = static_cast<uint32_t>(numel / kDequantTile);  // tiles wholly inside
  uint8_t* stage_bytes = reinterpret_cast<uint8_t*>(s_stage[warp]);

  const uint32_t stride = gridDim.x * kDequantWarps;
  // Evict-first loads: the packed weights are read once.
  auto load_tile = [&](uint32_t t) {
    return __ldcs(reinterpret_cast<const uint4*>(packed + (static_cast<int64_t>(t) * kDequantTile >> 1)) + lane);
  };
  // Software pipelining: the next tile's 16 bytes are requested before this tile is decoded
  // and stored, so each lane keeps two loads in flight (one alone left HBM under-used: 84-88%
  // of copy bandwidth measured on an H100).
  uint4 next = make_uint4(0, 0, 0, 0);
  if (aligned && blockIdx.x * kDequantWarps + warp < nfull) next = load_tile(blockIdx.x * kDequantWarps + warp);

  // Warp-uniform loop: whole warps take a tile, so the shuffles see all 32 lanes.
  for (uint32_t tile = blockIdx.x * kDequantWarps + warp; tile < ntiles; tile += stride) {
    const int64_t base = static_cast<int64_t>(tile) * kDequantTile;
    if (tile < nfull) {
      if (aligned) {
        s_stage[warp][lane] = next;
        if (tile + stride < nfull) next = load_tile(tile + stride);
      } else {
        // packed is a view that does not start on 16 bytes: coalesced byte loads instead.
#pragma unroll
        for (int i = 0; i < 16; ++i) stage_bytes[lane + 32 * i] = packed[(base >> 1) + lane + 32 * i];
      }
      // Lane L decodes the tile's block L (clamped: lanes past the tile's blocks, or past the
      // last block, decode a block that is then not used).
      const int64_t first_blk = base >> lg_bs;
      const int64_t blk = first_blk + lane < nblocks ? first_blk + lane : nblocks - 1;
      const float a_lane = block_absmax<kNested>(absmax, blk, s_code8, nested_absmax, off, lg_nbs);
      __syncwarp();

#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int chunk = c * 32 + lane;
        // kEps / 2 packed bytes: one conflict-free 32-bit (16-bit for fp32) shared load.
        const uint32_t bits = kEps == 8 ? reinterpret_cast<const uint32_t*>(s_stage[warp])[chunk]
                                        : reinterpret_cast<const uint16_t*>(s_stage[warp])[chunk];
        // 32 consecutive elements never straddle blocks (blocksize >= 32, a multiple of 32).
        const float a = __shfl_sync(0xffffffffu, a_lane, (chunk * kEps) >> lg_bs);
        // The high nibbles (even elements) and the low ones (odd elements), one per byte.
        const uint32_t hi = (bits >> 4) & 0x0f0f0f0fu;
        const uint32_t lo = bits & 0x0f0f0f0fu;
        float v[kEps];
#pragma unroll
        for (int j = 0; j < kEps / 2; ++j) {
          v[2 * j] = __fmul_rn(__shfl_sync(0xffffffffu, table_lane, static_cast<int>(hi >> (8 * j))), a);
          v[2 * j + 1] = __fmul_rn(__shfl_sync(0xffffffffu, table_lane, static_cast<int>(lo >> (8 * j))), a);
        }
        store16(out + base + chunk * kEps, v);
      }
      __syncwarp();  // the next tile overwrites the stage
    } else {
      // The last, partial tile: element by element (divergent, so the table comes from
      // constant memory rather than a shuffle).
      for (int64_t e = base + lane; e < numel; e += 32) {
        const uint32_t byte = packed[e >> 1];
        const uint32_t code = (e & 1) ? (byte & 15u) : (byte >> 4);
        const float value = __uint_as_float(kCodeValueBits[quant_type][code]);
        const float a = block_absmax<kNested>(absmax, e >> lg_bs, s_code8, nested_absmax, off, lg_nbs);
        out[e] = from_float<OutT>(__fmul_rn(value, a));
      }
    }
  }
}

template <typename OutT, bool kNested>
void launch_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax,
                            const float* nested_absmax, const float* nested_code,
                            const float* offset, at::Tensor& out, int64_t numel, int lg_bs,
                            int lg_nbs, QuantType qt) {
  auto kernel = dequantize_4bit_kernel<OutT, kNested>;
  TORCH_CHECK(ceil_div(numel, kDequantTile) <= int64_t{0x7fffffff} - kDequantThreads,
              "numel: expected fewer than 2^31 * ", num(kDequantTile), " elements, got ", num(numel));
  const int64_t ctas = ceil_div(ceil_div(numel, kDequantTile), kDequantWarps);
  // One CTA per 8 tiles, not a persistent grid: with a grid of resident CTAs walking the
  // tiles, an H100 reached 88% of copy bandwidth; many short CTAs keep more loads in flight
  // as CTAs retire and start (the loop below still strides, so both launch shapes are valid).
  const int grid = static_cast<int>(ctas < int64_t{0x7fffffff} ? ctas : int64_t{0x7fffffff});
  // 16-byte loads of packed need a 16-byte aligned start (a view may start anywhere).
  const bool aligned = is_aligned16(packed.data_ptr());
  kernel<<<grid, kDequantThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      packed.data_ptr<uint8_t>(), absmax.data_ptr(), nested_absmax, nested_code, offset,
      reinterpret_cast<OutT*>(out.data_ptr()), numel, lg_bs, lg_nbs, static_cast<int>(qt),
      aligned);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// Declared in quant_4bit.h: gemm_4bit.cu dequantizes through it where its kernel cannot run.
at::Tensor dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                           c10::string_view quant_type, int64_t numel, c10::ScalarType dtype,
                           const std::optional<at::Tensor>& nested_absmax,
                           const std::optional<at::Tensor>& nested_code,
                           const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  check_cuda(packed, "packed");
  check_dtype(packed, "packed", at::kByte);
  check_contiguous(packed, "packed");
  check_operand(absmax, "absmax", packed, "packed");
  const int lg_bs = log2_blocksize(blocksize, "blocksize");
  const QuantType qt = parse_quant_type(quant_type);
  TORCH_CHECK(numel >= 0, "numel: expected >= 0, got ", num(numel));
  check_numel(packed, "packed", (numel + 1) / 2, "(numel + 1) / 2 bytes");
  const int64_t nblocks = ceil_div(numel, blocksize);
  check_numel(absmax, "absmax", nblocks, "ceil(numel / blocksize)");

  const bool nested = nested_absmax.has_value();
  TORCH_CHECK(nested_code.has_value() == nested && offset.has_value() == nested,
              "nested_absmax, nested_code, offset: expected all three (double quant) or none, got "
              "nested_absmax ", nested ? "given" : "None", ", nested_code ",
              nested_code.has_value() ? "given" : "None", ", offset ",
              offset.has_value() ? "given" : "None");
  const int lg_nbs =
      check_absmax_dtype_and_nested(absmax, nested_absmax, nested_code, offset, nblocks, nested_blocksize, packed, "packed");

  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  dispatch_float(dtype, "dtype", [&](auto tag) {
    using OutT = typename decltype(tag)::type;
    if (numel == 0) return;
    const float* na = nested ? nested_absmax->data_ptr<float>() : nullptr;
    const float* nc = nested ? nested_code->data_ptr<float>() : nullptr;
    const float* off = nested ? offset->data_ptr<float>() : nullptr;
    if (nested) {
      launch_dequantize_4bit<OutT, true>(packed, absmax, na, nc, off, out, numel, lg_bs, lg_nbs, qt);
    } else {
      launch_dequantize_4bit<OutT, false>(packed, absmax, na, nc, off, out, numel, lg_bs, lg_nbs, qt);
    }
  });
  return out;
}

}  // namespace qlora_kernels

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("quantize_4bit", &qlora_kernels::quantize_4bit);
  m.impl("dequantize_4bit", &qlora_kernels::dequantize_4bit);
}
