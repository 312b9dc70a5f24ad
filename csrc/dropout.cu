// Dropout whose mask is never stored: it is regenerated from a seed in forward and backward
// (LoRA's dropout on x in qlora_kernels.matmul_4bit_lora).
//
// Element i keeps its value when its 16-bit random number, half (i % 2) (low first) of
// Philox4x32-10 output ((i / 2) % 4) of the counter (g_lo, g_hi, 0, 0), g = i / 8, under the key
// (seed_lo, seed_hi), is >= floor(p * 2^16) (an integer compare: no float conversion, P(drop) =
// p to 2^-16); kept values are multiplied by 1 / (1 - p) in float32,
// dropped ones are +0. The same function as qlora_kernels/reference.py (dropout_forward,
// dropout_backward_add) and the Triton kernels (tl.randint4x has this counter layout), so all
// three backends draw the same mask, tested bit for bit. One Philox call decides 8 elements
// (it had decided 4 with 32-bit randoms; the kernels that fuse the mask into a matmul are bound
// by Philox's integer multiplies). The mask of an element depends only
// on its flat index, not on how a thread reaches it: the vector and the scalar paths agree.
// The seed is an int argument, or (device_seed) an int64 tensor the kernel reads, which is what
// a captured CUDA graph needs to draw a new mask at every replay.
//
// The same mask fused into the LoRA branch's three thin matmuls (see "Dropout fused into the
// LoRA matmuls" below): dropout_linear (forward, dropout(x) @ A.T), matmul_dropout (backward,
// dropout(g @ A)) and dropout_grad_weight (backward, dA = g.T @ dropout(x)).
#include <torch/library.h>

// cuRAND's counter-based Philox (one call, no per-thread state). A toolkit without cuRAND's
// headers (torch's pip wheels ship none) gets ATen's implementation of the same Philox4x32-10
// (same constants, rounds and counter layout), so the masks are the same either way.
#if __has_include(<curand_kernel.h>)
#include <curand_kernel.h>
#define QLORA_KERNELS_CURAND_PHILOX 1
#else
#include <ATen/core/PhiloxRNGEngine.h>
#endif

#include <cstdio>
#include <limits>
#include <type_traits>

#include "common.cuh"

namespace qlora_kernels {
namespace {

constexpr int kDropoutThreads = 256;

// The four uint32 outputs of Philox group g: the 16-bit randoms of elements 8g .. 8g + 7.
__device__ __forceinline__ uint4 philox_group(uint64_t seed, uint64_t g) {
#ifdef QLORA_KERNELS_CURAND_PHILOX
  return curand_Philox4x32_10(make_uint4(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), 0u, 0u),
                              make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)));
#else
  // subsequence 0 and offset g: the engine's first output block is that of counter (g_lo, g_hi, 0, 0)
  at::philox_engine engine(seed, 0, g);
  uint4 r;
  r.x = engine();
  r.y = engine();
  r.z = engine();
  r.w = engine();
  return r;
#endif
}

__device__ __forceinline__ uint32_t component(const uint4& r, int j) {
  return j == 0 ? r.x : j == 1 ? r.y : j == 2 ? r.z : r.w;
}

// The 16-bit random number of element j (0..7) of a Philox group.
__device__ __forceinline__ uint32_t random16(const uint4& r, int j) {
  return (component(r, j >> 1) >> (16 * (j & 1))) & 0xffffu;
}

// One 16-byte vector of T: 8 bf16/fp16 values (one Philox group) or 4 fp32 values (half of one).
template <typename T>
struct Vec {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

// kMode 0: out = keep ? x * scale : 0 (forward). kMode 1: out = out + (keep ? grad * scale : 0)
// (backward, accumulating), with `in` = grad: a multiply, then an add, two roundings (no FMA),
// as the reference. One thread = one 16-byte vector per iteration (one LDG.128 / STG.128 per
// operand); a tensor that does not start on 16 bytes, or the last partial vector, goes element
// by element.
template <typename T, int kMode>
__global__ void __launch_bounds__(kDropoutThreads)
    dropout_kernel(const T* __restrict__ in, T* __restrict__ out, int64_t n, uint64_t seed_value,
                   const int64_t* __restrict__ device_seed, uint32_t threshold, float scale, bool vec) {
  using V = Vec<T>;
  // A seed in device memory is read here, at run time, so that a CUDA graph replays with
  // whatever the tensor holds then (a seed passed by value is frozen into the graph).
  const uint64_t seed = device_seed != nullptr ? static_cast<uint64_t>(*device_seed) : seed_value;
  constexpr int kElems = V::kElems;
  const int64_t nvec = ceil_div(n, kElems);
  const int64_t nfull = n / kElems;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < nvec; c += stride) {
    const int64_t e0 = c * kElems;
    // the vector's elements are all in Philox group e0 / 8 (kElems divides 8)
    const uint4 r = philox_group(seed, static_cast<uint64_t>(e0 / 8));
    const int j0 = static_cast<int>(e0 % 8);
    if (vec && c < nfull) {
      const uint4 a = __ldcs(reinterpret_cast<const uint4*>(in + e0));  // read once: evict-first
      uint4 o = make_uint4(0u, 0u, 0u, 0u);
      if constexpr (kMode == 1) o = *reinterpret_cast<const uint4*>(out + e0);
      const T* av = reinterpret_cast<const T*>(&a);
      T* ov = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        const bool keep = random16(r, j0 + i) >= threshold;
        const float d = keep ? __fmul_rn(to_float(av[i]), scale) : 0.0f;
        ov[i] = from_float<T>(kMode == 1 ? __fadd_rn(to_float(ov[i]), d) : d);
      }
      *reinterpret_cast<uint4*>(out + e0) = o;
    } else {
      const int64_t end = e0 + kElems < n ? e0 + kElems : n;
      for (int64_t e = e0; e < end; ++e) {
        const int i = static_cast<int>(e - e0);
        const bool keep = random16(r, j0 + i) >= threshold;
        const float d = keep ? __fmul_rn(to_float(in[e]), scale) : 0.0f;
        out[e] = from_float<T>(kMode == 1 ? __fadd_rn(to_float(out[e]), d) : d);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dropout fused into the LoRA matmuls (qlora_kernels.matmul_4bit_lora):
//
//   dropout_linear(x, w) = dropout_forward(x) @ w.T   x [M, K], w [r, K] -> [M, r]  (forward)
//   matmul_dropout(a, b) = dropout_forward(a @ b)     a [M, r], b [r, K] -> [M, K]  (backward: dX)
//   dropout_grad_weight(g, x) = g.T @ dropout_forward(x)  g [M, r], x [M, K] -> [r, K]  (backward: dA)
//
// Unfused, each is a dropout pass over an [M, K] tensor (a read and a write) beside a GEMM that
// reads or writes it once more; fused, the [M, K] tensor is read (dropout_linear,
// dropout_grad_weight) or written (matmul_dropout) once. The r-wide products (r <= 64) run on
// mma.sync m16n8k16 with float32 accumulators; those bytes do not bound the kernels (H100, 4096 x
// 22016, r = 64: 145-172 us where cuBLAS's products without dropout take 86-99; Philox is 15-25%
// of dropout_linear and dropout_grad_weight). Same mask, same roundings as the unfused ops: a dropped-out x element
// is rounded to T before it is multiplied (as dropout_forward stores it), and a @ b is rounded
// to T before the mask's scale (as cuBLAS stores it); only the order of the float32 sums differs.
//
// All three need K % 8 == 0 (16-byte rows, each starting a Philox group of 8 elements),
// 16-byte aligned operands, r <= 64, 16-bit T and sm_80; the host runs the unfused ops otherwise.

// Keeps or drops the 8 elements of v (elements e .. e + 7, e % 8 == 0: one Philox group) and
// rounds the kept ones, as dropout_kernel does: 4 words of two T each.
template <typename T>
__device__ __forceinline__ uint4 dropout8(const uint4& v, uint64_t seed, uint64_t e, uint32_t threshold,
                                          float scale) {
  const uint4 r = philox_group(seed, e / 8);
  const T* in = reinterpret_cast<const T*>(&v);
  uint4 out;
  T* o = reinterpret_cast<T*>(&out);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const bool keep = random16(r, i) >= threshold;
    o[i] = from_float<T>(keep ? __fmul_rn(to_float(in[i]), scale) : 0.0f);
  }
  return out;
}

__device__ __forceinline__ uint32_t word(const uint4& u, int i) {
  return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

// dropout_linear: a warp owns 32 rows of x (two m-tiles) and walks one K range (the grid's y
// splits K; the splits' float32 partial tiles are summed by sum_splits_kernel in a fixed order).
// Per 32-element step lane (g, t) loads 16 bytes (elements 8t .. 8t + 7) of x rows g, g + 8,
// g + 16, g + 24 and of w row 8n + g for each n-tile: a dot product may walk K in any order as
// long as both operands walk it alike, so MMA half h takes words 2h, 2h + 1 of each load as its
// (2t, 2t + 1) and (2t + 8, 2t + 9) pairs on both sides. No shuffles, 16-byte loads only. The
// CTA's 4 warps walk the same K range, so w's rows come from L1 after the first warp.
constexpr int kLinWarps = 4;
constexpr int kLinRows = 32;  // rows of x a warp
constexpr int kLinStep = 32;  // K elements a warp step

template <typename T, int kNT>  // kNT n-tiles of 8: r <= 8 kNT
__global__ void __launch_bounds__(kLinWarps * 32, 3)  // 3 CTAs an SM: 178 registers left 2 (H100: r = 64)
    dropout_linear_kernel(const T* __restrict__ x, const T* __restrict__ w, float* __restrict__ partial, int M,
                          int K, int r, int k_per_split, uint64_t seed_value,
                          const int64_t* __restrict__ device_seed, uint32_t threshold, float scale) {
  const uint64_t seed = device_seed != nullptr ? static_cast<uint64_t>(*device_seed) : seed_value;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = (static_cast<int>(blockIdx.x) * kLinWarps + warp) * kLinRows;
  const int k_begin = static_cast<int>(blockIdx.y) * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  const T* x_row[4];
  bool row_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + g + 8 * i;
    row_ok[i] = m < M;
    x_row[i] = x + static_cast<int64_t>(min(m, M - 1)) * K;
  }
  const T* w_row[kNT];
  bool w_ok[kNT];
#pragma unroll
  for (int n = 0; n < kNT; ++n) {
    const int j = 8 * n + g;
    w_ok[n] = j < r;
    w_row[n] = w + static_cast<int64_t>(min(j, r - 1)) * K;
  }
  float acc[2][kNT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int n = 0; n < kNT; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.0f;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  // The next step's x loads go out before this step's Philox and MMAs (one step of x in flight
  // per warp left the loop waiting on DRAM latency); w's rows come from L1 and are loaded in
  // their step.
  auto load_x = [&](int k_step, uint4 (&xs)[4]) {
    const int k = k_step + 8 * t;
#pragma unroll
    for (int i = 0; i < 4; ++i)  // x is read once: evict-first
      xs[i] = k < k_end && row_ok[i] ? __ldcs(reinterpret_cast<const uint4*>(x_row[i] + k)) : zero;
  };
  uint4 xv[4];
  load_x(k_begin, xv);
  for (int k_step = k_begin; k_step < k_end; k_step += kLinStep) {  // warp-uniform
    uint4 x_next[4];
    load_x(k_step + kLinStep, x_next);
    const int k = k_step + 8 * t;
    const bool k_ok = k < k_end;
    uint4 wv[kNT];
#pragma unroll
    for (int n = 0; n < kNT; ++n) wv[n] = k_ok && w_ok[n] ? __ldg(reinterpret_cast<const uint4*>(w_row[n] + k)) : zero;
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (k_ok && row_ok[i])
        xv[i] = dropout8<T>(xv[i], seed, static_cast<uint64_t>(m0 + g + 8 * i) * K + k, threshold, scale);
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const uint32_t a[4] = {word(xv[2 * mt], 2 * h), word(xv[2 * mt + 1], 2 * h), word(xv[2 * mt], 2 * h + 1),
                               word(xv[2 * mt + 1], 2 * h + 1)};
#pragma unroll
        for (int n = 0; n < kNT; ++n) mma_16816<T>(acc[mt][n], a, word(wv[n], 2 * h), word(wv[n], 2 * h + 1));
      }
#pragma unroll
    for (int i = 0; i < 4; ++i) xv[i] = x_next[i];
  }
  // Accumulators 0, 1: row g (+ 16 mt), columns 8n + 2t, + 1; 2, 3: row g + 8 (+ 16 mt).
  constexpr int kRP = 8 * kNT;
  float* out = partial + static_cast<int64_t>(blockIdx.y) * M * kRP;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = m0 + 16 * mt + g + 8 * half;
      if (m >= M) continue;
#pragma unroll
      for (int n = 0; n < kNT; ++n)
        *reinterpret_cast<float2*>(out + static_cast<int64_t>(m) * kRP + 8 * n + 2 * t) =
            make_float2(acc[mt][n][2 * half], acc[mt][n][2 * half + 1]);
    }
}

// out[m, j] = sum over splits s (in order) of partial[s, m, j], for j < r, rounded to T.
template <typename T>
__global__ void sum_splits_kernel(const float* __restrict__ partial, T* __restrict__ out, int splits, int M, int r,
                                  int rp) {
  const int64_t n = static_cast<int64_t>(M) * r;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / r;
    const int j = static_cast<int>(i - m * r);
    float sum = 0.0f;
    for (int s = 0; s < splits; ++s) sum += partial[(static_cast<int64_t>(s) * M + m) * rp + j];
    out[i] = from_float<T>(sum);
  }
}

// matmul_dropout: a CTA writes a [128 rows, 128 columns] tile of the output. It stages b's
// [r, 128] tile in shared memory (rows padded with zeros to 16 kKS), and each of its 8 warps
// a [16, 16 kKS] tile of a. B fragments come from b's tile by ldmatrix.trans (a row pitch of 272
// bytes puts the 8 rows of each 8x8 matrix in 8 different 16-byte bank groups), A fragments from
// the warp's tile of a. Epilogue: the accumulators, rounded to T, pass through the warp's a tile
// so that each lane masks and stores 8 contiguous columns (one Philox group, four chains in
// flight per lane).
constexpr int kMdWarps = 8;
constexpr int kMdCols = 128;
constexpr int kMdBPitch = kMdCols * 2 + 16;  // bytes

template <int kKS>
constexpr int md_a_pitch() { return 32 * kKS + 16; }  // bytes: 16 kKS elements + 16

template <typename T, int kKS>  // kKS k-steps of 16: r <= 16 kKS
__global__ void __launch_bounds__(kMdWarps * 32, 2)  // 2 CTAs an SM (143 registers left 1)
    matmul_dropout_kernel(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int M, int K,
                          int r, int rows_per_cta, uint64_t seed_value, const int64_t* __restrict__ device_seed,
                          uint32_t threshold, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync bf16/f16 and ldmatrix: sm_80 and up (the host runs the unfused ops below that)
#else
  constexpr int kRP = 16 * kKS;
  constexpr int kAPitch = md_a_pitch<kKS>();
  __shared__ __align__(16) uint8_t s_b[kRP * kMdBPitch];
  __shared__ __align__(16) uint8_t s_a[kMdWarps][16 * kAPitch];
  const uint64_t seed = device_seed != nullptr ? static_cast<uint64_t>(*device_seed) : seed_value;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int c0 = static_cast<int>(blockIdx.x) * kMdCols;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  // b's tile: 16-byte pieces (K % 8 == 0: a piece is all in or all past K); zeros past r and K
  for (int i = threadIdx.x; i < kRP * (kMdCols / 8); i += kMdWarps * 32) {
    const int j = i / (kMdCols / 8), c = c0 + 8 * (i % (kMdCols / 8));
    const uint4 v = j < r && c < K ? __ldg(reinterpret_cast<const uint4*>(b + static_cast<int64_t>(j) * K + c)) : zero;
    *reinterpret_cast<uint4*>(s_b + j * kMdBPitch + 2 * (c - c0)) = v;
  }
  __syncthreads();
  uint8_t* my_a = s_a[warp];
  const bool a_vec = r % 8 == 0;  // a's rows on 16 bytes (a itself is)
  const int m_begin = static_cast<int>(blockIdx.y) * rows_per_cta;
  const int m_end = min(M, m_begin + rows_per_cta);
  for (int m0 = m_begin + 16 * warp; m0 < m_end; m0 += 16 * kMdWarps) {  // warp-uniform
    __syncwarp();  // the last chunk's reads of my_a are done
    if (a_vec) {
      for (int i = lane; i < 16 * (kRP / 8); i += 32) {
        const int row = i / (kRP / 8), j = 8 * (i % (kRP / 8)), m = m0 + row;
        const uint4 v = m < M && j < r ? __ldg(reinterpret_cast<const uint4*>(a + static_cast<int64_t>(m) * r + j)) : zero;
        *reinterpret_cast<uint4*>(my_a + row * kAPitch + 2 * j) = v;
      }
    } else {
      for (int i = lane; i < 16 * kRP; i += 32) {
        const int row = i / kRP, j = i % kRP, m = m0 + row;
        const T v = m < M && j < r ? a[static_cast<int64_t>(m) * r + j] : from_float<T>(0.0f);
        *reinterpret_cast<T*>(my_a + row * kAPitch + 2 * j) = v;
      }
    }
    __syncwarp();
    float acc[kMdCols / 8][4];
#pragma unroll
    for (int n = 0; n < kMdCols / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < kKS; ++ks) {
      uint32_t af[4];
      af[0] = *reinterpret_cast<const uint32_t*>(my_a + g * kAPitch + 2 * (16 * ks + 2 * t));
      af[1] = *reinterpret_cast<const uint32_t*>(my_a + (g + 8) * kAPitch + 2 * (16 * ks + 2 * t));
      af[2] = *reinterpret_cast<const uint32_t*>(my_a + g * kAPitch + 2 * (16 * ks + 2 * t + 8));
      af[3] = *reinterpret_cast<const uint32_t*>(my_a + (g + 8) * kAPitch + 2 * (16 * ks + 2 * t + 8));
#pragma unroll
      for (int n = 0; n < kMdCols / 8; n += 2) {
        // matrices 0, 1: k rows 0-7, 8-15 of n-tile n; 2, 3: the same of n-tile n + 1
        const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(
            s_b + (16 * ks + (lane & 15)) * kMdBPitch + 16 * (n + (lane >> 4))));
        uint32_t bf[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(bf[0]), "=r"(bf[1]), "=r"(bf[2]), "=r"(bf[3])
                     : "r"(addr));
        mma_16816<T>(acc[n], af, bf[0], bf[1]);
        mma_16816<T>(acc[n + 1], af, bf[2], bf[3]);
      }
    }
    // Epilogue, one pair of n-tiles (16 columns) at a time: the rounded accumulators go through
    // this warp's a tile (free after the MMAs) so that each lane ends up with 8 contiguous
    // columns of one row, one Philox group: lane L takes row L % 16, columns 8 (L / 16) .. + 7 of
    // the pair. Each group's randoms are drawn once (in the MMA layout a quad's lanes hold 2
    // columns of 2 rows, and drew every group twice, swapping halves), and each lane stores 16
    // bytes (a warp writes 16 full 32-byte sectors per store instead of 8 half ones). A staged
    // row is 12 words (48 bytes): the 32-bit stores of the MMA layout fall in 32 distinct banks,
    // and so do the 16-byte loads of each group of 8 lanes (rows 0-7, 8-15).
    constexpr int kStageWords = 12;
    static_assert(16 * kStageWords * 4 <= 16 * md_a_pitch<1>(), "a pair of n-tiles fits in the a tile");
    uint32_t* stage = reinterpret_cast<uint32_t*>(my_a);
    const int my_row = lane & 15, my_half = lane >> 4;
    const int my_m = m0 + my_row;
    const uint64_t my_group0 = (static_cast<uint64_t>(my_m) * K + c0 + 8 * my_half) / 8;  // pair 0's
    constexpr int kPairs = kMdCols / 16;
    constexpr int kBatch = 4;  // pairs whose Philox chains run side by side (ILP)
#pragma unroll
    for (int p0 = 0; p0 < kPairs; p0 += kBatch) {
      uint4 rnd[kBatch];
#pragma unroll
      for (int q = 0; q < kBatch; ++q) rnd[q] = philox_group(seed, my_group0 + 2 * (p0 + q));
#pragma unroll
      for (int q = 0; q < kBatch; ++q) {
        const int n = 2 * (p0 + q);
        __syncwarp();  // the last pair's reads of the stage (and the MMAs' reads of a) are done
#pragma unroll
        for (int half = 0; half < 2; ++half)  // rows g, g + 8; a @ b rounded to T, as cuBLAS stores it
#pragma unroll
          for (int j = 0; j < 2; ++j)
            stage[(g + 8 * half) * kStageWords + 4 * j + t] = pack2<T>(acc[n + j][2 * half], acc[n + j][2 * half + 1]);
        __syncwarp();
        const uint4 v = *reinterpret_cast<const uint4*>(stage + my_row * kStageWords + 4 * my_half);
        const int c = c0 + 16 * (p0 + q) + 8 * my_half;
        if (my_m < M && c < K) {  // K % 8 == 0: the 8 columns are all in or all past K
          const T* in = reinterpret_cast<const T*>(&v);
          uint4 o;
          T* ov = reinterpret_cast<T*>(&o);
#pragma unroll
          for (int i = 0; i < 8; ++i)
            ov[i] = from_float<T>(random16(rnd[q], i) >= threshold ? __fmul_rn(to_float(in[i]), scale) : 0.0f);
          *reinterpret_cast<uint4*>(out + static_cast<int64_t>(my_m) * K + c) = o;
        }
      }
    }
  }
#endif
}

// dropout_grad_weight: g.T @ dropout_forward(x), the weight gradient of dropout_linear (the
// LoRA branch's dA): g [M, r], x [M, K] -> [r, K], a sum over the M tokens. A CTA owns 128
// columns of K and a range of tokens (the grid's y splits M; the float32 partial tiles are
// summed by sum_splits_kernel in a fixed order). Per chunk of 32 tokens it stages in shared
// memory x's [32, 128] tile, masked and rounded as dropout_forward stores it (a 16-byte piece
// of x is one Philox group), and g's [32, r] tile; warp w computes columns 16 w .. 16 w + 15
// for all r rows. Tokens are the MMA's k, so both operands come by ldmatrix.trans: A = g.T from
// g's tile, B = the masked x from x's tile (x's row pitch of 272 bytes and g's of 32 kMT + 16
// put the 8 rows of each 8x8 matrix in 8 different 16-byte bank groups). The next chunk's
// global loads are in flight during this chunk's MMAs; two buffers, one barrier a chunk.
constexpr int kGwWarps = 8;
constexpr int kGwCols = 128;                  // columns of x a CTA: 16 a warp
constexpr int kGwTokens = 32;                 // tokens a chunk: two MMA k-steps
constexpr int kGwXPitch = kGwCols * 2 + 16;   // bytes
constexpr int kGwXPieces = kGwTokens * kGwCols / 8 / (kGwWarps * 32);  // 16-byte pieces of x a thread: 2

template <int kMT>
constexpr int gw_g_pitch() { return 32 * kMT + 16; }  // bytes: 16 kMT elements + 16

template <typename T, int kMT>  // kMT m-tiles of 16: r <= 16 kMT
__global__ void __launch_bounds__(kGwWarps * 32, 3)  // 3 CTAs an SM: 80 registers at r = 64, no spills (H100)
    dropout_grad_weight_kernel(const T* __restrict__ g, const T* __restrict__ x, float* __restrict__ partial,
                               T* __restrict__ direct, int M, int K, int r, int tokens_per_cta, uint64_t seed_value,
                               const int64_t* __restrict__ device_seed, uint32_t threshold, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync bf16/f16 and ldmatrix: sm_80 and up (the host runs the unfused ops below that)
#else
  constexpr int kRP = 16 * kMT;
  constexpr int kGPitch = gw_g_pitch<kMT>();
  constexpr int kGPieces = kGwTokens * kRP / 8;  // 16-byte pieces of g's tile: 64 kMT <= 256 threads
  __shared__ __align__(16) uint8_t s_x[2][kGwTokens * kGwXPitch];
  __shared__ __align__(16) uint8_t s_g[2][kGwTokens * kGPitch];
  const uint64_t seed = device_seed != nullptr ? static_cast<uint64_t>(*device_seed) : seed_value;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c0 = static_cast<int>(blockIdx.x) * kGwCols;
  const int m_begin = static_cast<int>(blockIdx.y) * tokens_per_cta;
  const int m_end = min(M, m_begin + tokens_per_cta);
  const bool g_vec = r % 8 == 0;  // g's rows on 16 bytes (g itself is)
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  // This thread's pieces: x pieces tid + 256 q (token i / 16, columns 8 (i % 16) ..), and g
  // piece tid (token tid / (kRP / 8), r columns 8 (tid % (kRP / 8)) ..) where tid < kGPieces.
  auto load = [&](int m0, uint4 (&xv)[kGwXPieces], uint4& gv) {
#pragma unroll
    for (int q = 0; q < kGwXPieces; ++q) {
      const int i = tid + kGwWarps * 32 * q, m = m0 + i / 16, c = c0 + 8 * (i % 16);
      xv[q] = m < m_end && c < K ? __ldcs(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(m) * K + c)) : zero;
    }
    gv = zero;
    if (tid < kGPieces) {
      const int m = m0 + tid / (kRP / 8), j = 8 * (tid % (kRP / 8));
      if (m < m_end && j < r) {
        const T* src = g + static_cast<int64_t>(m) * r + j;
        if (g_vec) {
          gv = __ldg(reinterpret_cast<const uint4*>(src));
        } else {
          T* v = reinterpret_cast<T*>(&gv);
          for (int e = 0; e < 8 && j + e < r; ++e) v[e] = src[e];
        }
      }
    }
  };
  float acc[kMT][2][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int n = 0; n < 2; ++n) acc[mt][n][0] = acc[mt][n][1] = acc[mt][n][2] = acc[mt][n][3] = 0.0f;
  uint4 xv[kGwXPieces], gv;
  load(m_begin, xv, gv);
  int buf = 0;
  for (int m0 = m_begin; m0 < m_end; m0 += kGwTokens, buf ^= 1) {  // CTA-uniform
    // This chunk into buffer buf: x masked as dropout_forward stores it. (Every warp is past
    // the MMAs that last read buf: they came before the previous chunk's barrier.)
#pragma unroll
    for (int q = 0; q < kGwXPieces; ++q) {
      const int i = tid + kGwWarps * 32 * q, m = m0 + i / 16, c = c0 + 8 * (i % 16);
      const uint4 v = m < m_end && c < K ? dropout8<T>(xv[q], seed, static_cast<uint64_t>(m) * K + c, threshold, scale)
                                         : zero;
      *reinterpret_cast<uint4*>(s_x[buf] + (i / 16) * kGwXPitch + 16 * (i % 16)) = v;
    }
    if (tid < kGPieces)
      *reinterpret_cast<uint4*>(s_g[buf] + (tid / (kRP / 8)) * kGPitch + 16 * (tid % (kRP / 8))) = gv;
    __syncthreads();
    load(m0 + kGwTokens, xv, gv);  // the next chunk, in flight during these MMAs
#pragma unroll
    for (int ks = 0; ks < kGwTokens / 16; ++ks) {
      // B: n-tiles 2 warp, 2 warp + 1 (matrices: tokens 0-7 and 8-15 of each)
      const uint32_t b_addr = static_cast<uint32_t>(__cvta_generic_to_shared(
          s_x[buf] + (16 * ks + (lane & 15)) * kGwXPitch + 16 * (2 * warp + (lane >> 4))));
      uint32_t bf[4];
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                   : "=r"(bf[0]), "=r"(bf[1]), "=r"(bf[2]), "=r"(bf[3])
                   : "r"(b_addr));
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        // A = g.T: matrices (r rows 0-7, tokens 0-7), (r 8-15, tokens 0-7), (r 0-7, tokens 8-15),
        // (r 8-15, tokens 8-15); lane L gives row L % 8 of matrix L / 8, a token row of g's tile
        const int quad = lane >> 3;
        const uint32_t a_addr = static_cast<uint32_t>(__cvta_generic_to_shared(
            s_g[buf] + (16 * ks + (lane & 7) + 8 * (quad >> 1)) * kGPitch + 2 * (16 * mt + 8 * (quad & 1))));
        uint32_t af[4];
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(af[0]), "=r"(af[1]), "=r"(af[2]), "=r"(af[3])
                     : "r"(a_addr));
        mma_16816<T>(acc[mt][0], af, bf[0], bf[1]);
        mma_16816<T>(acc[mt][1], af, bf[2], bf[3]);
      }
    }
  }
  // Accumulators 0, 1: row (of r) 16 mt + lane / 4, columns 16 warp + 8 n + 2 (lane % 4), + 1;
  // 2, 3: the row 8 further. K % 8 == 0: a column pair is all in or all past K. With one split
  // (direct) the sums are final: rounded to T here, no partial buffer and no sum pass.
  float* out = partial + static_cast<int64_t>(blockIdx.y) * r * K;
  const int gq = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int j = 16 * mt + gq + 8 * half;
      if (j >= r) continue;
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        const int c = c0 + 16 * warp + 8 * n + 2 * t;
        if (c >= K) continue;
        const int64_t at = static_cast<int64_t>(j) * K + c;
        if (direct != nullptr)
          *reinterpret_cast<uint32_t*>(direct + at) = pack2<T>(acc[mt][n][2 * half], acc[mt][n][2 * half + 1]);
        else
          *reinterpret_cast<float2*>(out + at) = make_float2(acc[mt][n][2 * half], acc[mt][n][2 * half + 1]);
      }
    }
#endif
}

void check_p(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected a dropout probability in [0, 1), got ", fnum(p));
}

// floor(p * 2^16) (exact: scaling by a power of two), and 1 / (1 - p) rounded to float32:
// reference.dropout_threshold / dropout_scale.
uint32_t threshold_of(double p) {
  const double t = p * 65536.0;
  return t >= 65535.0 ? 0xffffu : static_cast<uint32_t>(t);
}

float scale_of(double p) { return static_cast<float>(1.0 / (1.0 - p)); }

// device_seed: None, or an int64 tensor of one element on the device of `like`.
const int64_t* device_seed_ptr(const std::optional<at::Tensor>& device_seed, const at::Tensor& like,
                               const char* like_name) {
  if (!device_seed.has_value()) return nullptr;
  const at::Tensor& s = *device_seed;
  TORCH_CHECK(s.scalar_type() == at::kLong, "device_seed: expected an int64 tensor, got ", s.scalar_type());
  TORCH_CHECK(s.numel() == 1, "device_seed: expected one element, got shape ", dims(s.sizes()));
  TORCH_CHECK(s.device() == like.device(), "device_seed: expected a tensor on ", like.device(), " (the device of ",
              like_name, "), got ", s.device());
  return s.data_ptr<int64_t>();
}

template <int kMode>
void launch(const at::Tensor& in, const char* in_name, const at::Tensor& out, int64_t seed,
            const int64_t* device_seed, double p) {
  const int64_t n = in.numel();
  dispatch_float(in.scalar_type(), in_name, [&](auto tag) {
    if (n == 0) return;
    using T = typename decltype(tag)::type;
    auto kernel = dropout_kernel<T, kMode>;
    const int64_t vectors = ceil_div(n, Vec<T>::kElems);
    const int grid = grid_size(kernel, kDropoutThreads, ceil_div(vectors, kDropoutThreads));
    // 16-byte loads and stores need both operands on 16 bytes (a view may start anywhere).
    const bool vec = is_aligned16(in.data_ptr()) && is_aligned16(out.data_ptr());
    kernel<<<grid, kDropoutThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const T*>(in.data_ptr()), reinterpret_cast<T*>(out.data_ptr()), n,
        static_cast<uint64_t>(seed), device_seed, threshold_of(p), scale_of(p), vec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dropout_forward(in) into a new tensor (the caller has checked in and p, and set the device).
at::Tensor dropped(const at::Tensor& in, const char* in_name, int64_t seed, const int64_t* device_seed, double p) {
  at::Tensor out = at::empty_like(in, at::MemoryFormat::Contiguous);
  launch<0>(in, in_name, out, seed, device_seed, p);
  return out;
}

// out [rows, cols] (T) = the float32 partial tiles partial [splits, rows, pitch] summed over the
// splits in order (sum_splits_kernel).
template <typename T>
void sum_splits(const at::Tensor& partial, const at::Tensor& out, int64_t splits, int64_t rows, int64_t cols,
                int64_t pitch, cudaStream_t stream) {
  auto sum = sum_splits_kernel<T>;
  const int sum_grid = grid_size(sum, 256, ceil_div(rows * cols, 256));
  sum<<<sum_grid, 256, 0, stream>>>(partial.data_ptr<float>(), reinterpret_cast<T*>(out.data_ptr()),
                                    static_cast<int>(splits), static_cast<int>(rows), static_cast<int>(cols),
                                    static_cast<int>(pitch));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor dropout_forward(const at::Tensor& x, int64_t seed, double p,
                           const std::optional<at::Tensor>& device_seed) {
  check_cuda(x, "x");
  check_contiguous(x, "x");
  check_p(p);
  const int64_t* seed_ptr = device_seed_ptr(device_seed, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  return dropped(x, "x", seed, seed_ptr, p);
}

void dropout_backward_add(const at::Tensor& out, const at::Tensor& grad, int64_t seed, double p,
                          const std::optional<at::Tensor>& device_seed) {
  check_cuda(out, "out");
  check_contiguous(out, "out");
  check_operand(grad, "grad", out, "out");
  TORCH_CHECK(grad.sizes().equals(out.sizes()), "grad: expected the shape of out ", dims(out.sizes()),
              ", got ", dims(grad.sizes()));
  TORCH_CHECK(grad.scalar_type() == out.scalar_type(), "grad: expected the dtype of out (",
              out.scalar_type(), "), got ", grad.scalar_type());
  check_p(p);
  const int64_t* seed_ptr = device_seed_ptr(device_seed, out, "out");
  const c10::cuda::CUDAGuard guard(out.device());
  launch<1>(grad, "grad", out, seed, seed_ptr, p);
}

// Whether the fused kernels run on this device: sm_80 and up, and a binary of this build made
// for it (a build for 7.5+PTX JIT-compiled on an sm_80 GPU would have only their __trap branch).
bool fused_kernels_run(int device) {
  return compute_capability_major(device) >= 8 &&
         kernel_built_for(reinterpret_cast<const void*>(matmul_dropout_kernel<__nv_bfloat16, 1>), device, 80);
}

// The fused kernels' conditions (see "Dropout fused into the LoRA matmuls"); the unfused ops
// otherwise.
bool fusable(const at::Tensor& big, const at::Tensor& small, int64_t r) {
  const auto dt = big.scalar_type();
  return (dt == at::kBFloat16 || dt == at::kHalf) && big.size(1) % 8 == 0 && r >= 1 && r <= 64 &&
         is_aligned16(big.data_ptr()) && is_aligned16(small.data_ptr()) && fused_kernels_run(big.get_device());
}

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, ": expected a 2-D tensor, got shape ", dims(t.sizes()));
}

// The operands of a fused dropout matmul (reference.check_thin_matmul, same words): CUDA,
// contiguous, 2-D, one dtype and device, first's dim first_dim equal to second's dim second_dim
// (`what` names that size).
void check_thin_operands(const at::Tensor& first, const char* first_name, const at::Tensor& second,
                         const char* second_name, int first_dim, int second_dim, const char* what) {
  check_cuda(first, first_name);
  check_contiguous(first, first_name);
  check_2d(first, first_name);
  check_operand(second, second_name, first, first_name);
  check_2d(second, second_name);
  TORCH_CHECK(second.scalar_type() == first.scalar_type(), second_name, ": expected the dtype of ", first_name,
              " (", first.scalar_type(), "), got ", second.scalar_type());
  TORCH_CHECK(second.size(second_dim) == first.size(first_dim), second_name, ": expected dim ", num(second_dim),
              " to be ", num(first.size(first_dim)), " (", what, " of ", first_name, "), got shape ",
              dims(second.sizes()));
}

at::Tensor dropout_linear(const at::Tensor& x, const at::Tensor& weight, int64_t seed, double p,
                          const std::optional<at::Tensor>& device_seed) {
  check_thin_operands(x, "x", weight, "weight", 1, 1, "K");
  check_p(p);
  const int64_t* seed_ptr = device_seed_ptr(device_seed, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), r = weight.size(0);
  if (M == 0 || r == 0) return at::empty({M, r}, x.options());
  if (K == 0) return at::zeros({M, r}, x.options());
  if (!fusable(x, weight, r) || M > std::numeric_limits<int>::max() / 2 || K > std::numeric_limits<int>::max() / 2) {
    return at::mm(dropped(x, "x", seed, seed_ptr, p), weight.t());
  }
  const int nt = r <= 16 ? 2 : r <= 32 ? 4 : 8;
  const int64_t row_blocks = ceil_div(M, kLinWarps * kLinRows);
  const int device = x.get_device();
  // splits of K: about 4 CTAs per SM in all, each at least 256 elements of K
  const int64_t want = ceil_div(4 * multiprocessor_count(device), row_blocks);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(want, K / 256));
  const int64_t k_per_split = ceil_div(ceil_div(K, splits), kLinStep) * kLinStep;
  const int64_t used_splits = ceil_div(K, k_per_split);
  at::Tensor partial = at::empty({used_splits, M, 8 * nt}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty({M, r}, x.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, float>) {
      const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(used_splits));
      auto run = [&](auto kernel) {
        kernel<<<grid, kLinWarps * 32, 0, stream>>>(
            reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(weight.data_ptr()),
            partial.data_ptr<float>(), static_cast<int>(M), static_cast<int>(K), static_cast<int>(r),
            static_cast<int>(k_per_split), static_cast<uint64_t>(seed), seed_ptr, threshold_of(p), scale_of(p));
      };
      if (nt == 2) run(dropout_linear_kernel<T, 2>);
      else if (nt == 4) run(dropout_linear_kernel<T, 4>);
      else run(dropout_linear_kernel<T, 8>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_splits<T>(partial, out, used_splits, M, r, 8 * nt, stream);
    }
  });
  return out;
}

at::Tensor matmul_dropout(const at::Tensor& a, const at::Tensor& b, int64_t seed, double p,
                          const std::optional<at::Tensor>& device_seed) {
  check_thin_operands(a, "a", b, "b", 1, 0, "r");
  check_p(p);
  const int64_t* seed_ptr = device_seed_ptr(device_seed, a, "a");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(0), r = a.size(1), K = b.size(1);
  if (M == 0 || K == 0) return at::empty({M, K}, a.options());
  if (r == 0) return at::zeros({M, K}, a.options());
  // (grid.y, one CTA per 128 rows, is at most 65535)
  if (!fusable(b, a, r) || M > 65535LL * 16 * kMdWarps || K > std::numeric_limits<int>::max() / 2) {
    return dropped(at::mm(a, b), "a @ b", seed, seed_ptr, p);
  }
  at::Tensor out = at::empty({M, K}, a.options());
  const int ks = r <= 16 ? 1 : r <= 32 ? 2 : 4;
  const int64_t col_blocks = ceil_div(K, kMdCols);
  // One 16-row chunk per warp: a CTA writes a [128, 128] tile. CTAs that walked 1024 rows of
  // their 128 columns (b's tile staged once for more rows) wrote 4096 x 22016 in 256 us against
  // 194 (H100).
  const int64_t rows_per_cta = 16 * kMdWarps;
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(ceil_div(M, rows_per_cta)));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(a.scalar_type(), "a", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, float>) {
      auto run = [&](auto kernel) {
        kernel<<<grid, kMdWarps * 32, 0, stream>>>(
            reinterpret_cast<const T*>(a.data_ptr()), reinterpret_cast<const T*>(b.data_ptr()),
            reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(M), static_cast<int>(K), static_cast<int>(r),
            static_cast<int>(rows_per_cta), static_cast<uint64_t>(seed), seed_ptr, threshold_of(p), scale_of(p));
      };
      if (ks == 1) run(matmul_dropout_kernel<T, 1>);
      else if (ks == 2) run(matmul_dropout_kernel<T, 2>);
      else run(matmul_dropout_kernel<T, 4>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor dropout_grad_weight(const at::Tensor& g, const at::Tensor& x, int64_t seed, double p,
                               const std::optional<at::Tensor>& device_seed) {
  check_thin_operands(g, "g", x, "x", 0, 0, "M");
  check_p(p);
  const int64_t* seed_ptr = device_seed_ptr(device_seed, g, "g");
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t M = g.size(0), r = g.size(1), K = x.size(1);
  if (r == 0 || K == 0) return at::empty({r, K}, g.options());
  if (M == 0) return at::zeros({r, K}, g.options());
  // (grid.x, one CTA per 128 columns, is below 2^31 for any int K)
  if (!fusable(x, g, r) || M > std::numeric_limits<int>::max() / 2 || K > std::numeric_limits<int>::max() / 2) {
    return at::mm(g.t(), dropped(x, "x", seed, seed_ptr, p));
  }
  const int mt = r <= 16 ? 1 : r <= 32 ? 2 : 4;
  const int64_t col_blocks = ceil_div(K, kGwCols);
  at::Tensor out = at::empty({r, K}, x.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "x", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, float>) {
      auto run = [&](auto kernel) {
        // Splits of M: as many as fit in one wave with the column blocks (each at least 256
        // tokens). A second, partial wave cost about as much as a full one: at r = 64 (2 CTAs
        // an SM, before the kernel fit 3) 4096 x 22016 took 244 us in 344 CTAs on 264 slots.
        const int64_t slots = grid_size(kernel, kGwWarps * 32, std::numeric_limits<int64_t>::max());
        const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(slots / col_blocks, M / 256));
        const int64_t tokens_per_cta = ceil_div(ceil_div(M, splits), kGwTokens) * kGwTokens;
        const int64_t used_splits = ceil_div(M, tokens_per_cta);
        const bool direct = used_splits == 1;
        at::Tensor partial = direct ? at::Tensor() : at::empty({used_splits, r, K}, x.options().dtype(at::kFloat));
        const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(used_splits));
        kernel<<<grid, kGwWarps * 32, 0, stream>>>(
            reinterpret_cast<const T*>(g.data_ptr()), reinterpret_cast<const T*>(x.data_ptr()),
            direct ? nullptr : partial.data_ptr<float>(), direct ? reinterpret_cast<T*>(out.data_ptr()) : nullptr,
            static_cast<int>(M), static_cast<int>(K), static_cast<int>(r), static_cast<int>(tokens_per_cta),
            static_cast<uint64_t>(seed), seed_ptr, threshold_of(p), scale_of(p));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        if (direct) return;
        sum_splits<T>(partial, out, used_splits, r, K, K, stream);  // out [r, K]
      };
      if (mt == 1) run(dropout_grad_weight_kernel<T, 1>);
      else if (mt == 2) run(dropout_grad_weight_kernel<T, 2>);
      else run(dropout_grad_weight_kernel<T, 4>);
    }
  });
  return out;
}

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("dropout_forward", &qlora_kernels::dropout_forward);
  m.impl("dropout_backward_add", &qlora_kernels::dropout_backward_add);
  m.impl("dropout_linear", &qlora_kernels::dropout_linear);
  m.impl("matmul_dropout", &qlora_kernels::matmul_dropout);
  m.impl("dropout_grad_weight", &qlora_kernels::dropout_grad_weight);
}
