// Fused 4-bit matmul for small batches (decode): out[M, N] = x[M, K] @ W[N, K]^T (+ bias), with W
// in bitsandbytes' 4-bit layout (row-major flat, element 2j in the high nibble of byte j, one
// absmax per `blocksize` flat elements, optionally double-quantized to 8 bits). Each weight byte
// is read from memory once and decoded in registers: no dequantized W, no float32 absmax.
//
// At M = 1..64 the layer is bound by the bytes of W, so the kernel is built around moving them:
//
// * Tensor cores do the arithmetic: mma.sync m16n8k16 with W as the A operand (16 weight rows)
//   and x^T as B (8 tokens), float32 accumulators. A warp owns 16 rows and T * 8 tokens (T
//   n-tiles of 8), so each decoded weight fragment feeds T MMAs: for M > 1 the decode is paid
//   once for all rows of x.
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
// * Split-K inside the CTA: its 8 warps take the K steps of one 16-row tile round-robin and
//   reduce through shared memory at the end. One launch, no workspace, deterministic sums; an
//   N = 4096 layer still gives 256 CTAs of 8 warps (about two per SM on an H100).
//
// Numerics: code values are rounded to x's 16-bit type, multiplied by the absmax (also rounded
// to it) in that type, then summed by the MMA in float32. That is two more roundings than
// x.float() @ dequantize(W).float().T: about 2^-8 relative per weight for bf16, averaging out
// over K (the tests bound the result at 1e-2 for bf16 and 2e-3 for fp16).
#include <torch/library.h>

#include "common.cuh"

namespace qlora_kernels {
namespace {

constexpr int kMmWarps = 8;                 // K-slices (warps) per CTA
constexpr int kMmThreads = kMmWarps * 32;
constexpr int kTileRows = 16;               // weight rows per CTA: the MMA's m
constexpr int kStepK = 128;                 // K elements per warp step: 4 lanes x 32
constexpr int kTableWords = 256 * 32;       // byte -> pair table, one copy per lane

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

// One m16n8k16 MMA, float32 accumulate. a: the four A registers (rows g / g+8, cols 2t / 2t+8);
// b0, b1: the B registers (k 2t, 2t+1 and 2t+8, 2t+9 of token g).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16/f16 m16n8k16 needs sm_80; the host refuses older GPUs before launching
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// What one warp step reads from global memory for one lane: 16 bytes of each of its two weight
// rows and the raw absmax of both chunks (the float32 bits, or the 8-bit code and its nested
// absmax). Loaded two steps ahead of its use, so that the loads of the next steps are in flight
// while this one is decoded (loading each step when it came left an H100 at 20-55% of copy
// bandwidth).
struct StepLoads {
  uint4 wa, wb;
  uint32_t ra, rb;   // float32 absmax bits, or the double-quant code
  float na, nb;      // the nested absmax (double quant only)
};

__device__ __forceinline__ StepLoads load_step(const uint8_t* wa, const uint8_t* wb, int64_t ea,
                                               int64_t eb, int k0, bool k_ok,
                                               const void* __restrict__ absmax, bool nested,
                                               const float* __restrict__ nested_absmax, int lg_bs,
                                               int lg_nbs) {
  StepLoads l;
  const uint4 zero = make_uint4(0, 0, 0, 0);
  l.wa = zero;
  l.wb = zero;
  l.ra = l.rb = 0u;
  l.na = l.nb = 0.0f;
  if (!k_ok) return l;
  // Evict-first: each weight byte is read once; x stays cached for the other CTAs.
  l.wa = __ldcs(reinterpret_cast<const uint4*>(wa + k0 / 2));
  l.wb = __ldcs(reinterpret_cast<const uint4*>(wb + k0 / 2));
  const int64_t ba = (ea + k0) >> lg_bs, bb = (eb + k0) >> lg_bs;
  if (nested) {
    l.ra = __ldg(static_cast<const uint8_t*>(absmax) + ba);
    l.rb = __ldg(static_cast<const uint8_t*>(absmax) + bb);
    l.na = __ldg(nested_absmax + (ba >> lg_nbs));
    l.nb = __ldg(nested_absmax + (bb >> lg_nbs));
  } else {
    l.ra = __float_as_uint(__ldg(static_cast<const float*>(absmax) + ba));
    l.rb = __float_as_uint(__ldg(static_cast<const float*>(absmax) + bb));
  }
  return l;
}

// A chunk's absmax as a broadcast pair of T (0 for a lane past K: its MMA terms vanish).
template <typename T>
__device__ __forceinline__ uint32_t chunk_scale(uint32_t raw, float nested_value, bool k_ok,
                                                bool nested, const float* s_code8, float offset) {
  if (!k_ok) return 0u;
  const float a = nested ? s_code8[raw] * nested_value + offset : __uint_as_float(raw);
  const T h = from_float<T>(a);
  typename Pair<T>::type p;
  p.x = h;
  p.y = h;
  uint32_t u;
  memcpy(&u, &p, sizeof(u));
  return u;
}

// Pair (as one 32-bit register) times the broadcast scale pair: one HMUL2.
template <typename T>
__device__ __forceinline__ uint32_t scale_pair(uint32_t v, uint32_t s) {
  typename Pair<T>::type a, b;
  memcpy(&a, &v, sizeof(a));
  memcpy(&b, &s, sizeof(b));
  const typename Pair<T>::type r = __hmul2(a, b);
  uint32_t u;
  memcpy(&u, &r, sizeof(u));
  return u;
}

__device__ __forceinline__ uint32_t word_of(const uint4& u, int i) {
  return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w;
}

// kT: n-tiles of 8 tokens per warp (1, 2, 4 or 8: up to 64 tokens per CTA).
template <typename T, int kT>
__global__ void __launch_bounds__(kMmThreads)
    matmul_4bit_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed,
                       const void* __restrict__ absmax, const float* __restrict__ nested_absmax,
                       const float* __restrict__ nested_code, const float* __restrict__ offset,
                       const T* __restrict__ bias, T* __restrict__ out, int M, int N, int K,
                       int lg_bs, int lg_nbs, int quant_type, bool nested) {
  // The byte -> pair table; after the main loop the same memory holds the warps' partial sums.
  __shared__ __align__(16) uint32_t s_table[kTableWords];
  __shared__ float s_code8[256];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;

  const int row0 = blockIdx.x * kTileRows;
  const int tok0 = blockIdx.y * kT * 8;
  // Rows past N load row N - 1 (valid memory) and are not stored.
  const int64_t row_a = min(row0 + g, N - 1);
  const int64_t row_b = min(row0 + g + 8, N - 1);
  const uint8_t* wa = packed + row_a * (K / 2);
  const uint8_t* wb = packed + row_b * (K / 2);
  const int64_t ea = row_a * K, eb = row_b * K;  // flat index of each row's first element
  const int nsteps = (K + kStepK - 1) / kStepK;
  // K % 32 == 0: a lane's 32-element chunk is wholly inside K or wholly past it. A lane past
  // K still takes part in the MMAs (they are warp-wide), with a zero scale and zero x.
  auto step_k0 = [&](int step) { return step * kStepK + t * 32; };
  auto load = [&](int step) {
    const int k0 = step_k0(step);
    return load_step(wa, wb, ea, eb, k0, step < nsteps && k0 < K, absmax, nested, nested_absmax,
                     lg_bs, lg_nbs);
  };
  // Two steps of loads are kept in flight ahead of the one being decoded (about 3 KB per warp);
  // the first ones go out before the table is built, so they overlap with it.
  StepLoads next = load(warp);
  StepLoads after_next = load(warp + kMmWarps);

  // Table: entry b holds (code[b >> 4], code[b & 15]) as a pair of T, the high nibble (the
  // element at the lower address) in the low half. All 32 copies of an entry are equal, so a
  // thread writes 4 lanes' copies with one 16-byte store.
  for (int i = tid; i < kTableWords / 4; i += kMmThreads) {
    const int b = i >> 3;
    const float lo = __uint_as_float(kCodeValueBits[quant_type][b >> 4]);
    const float hi = __uint_as_float(kCodeValueBits[quant_type][b & 15]);
    const uint32_t v = pack2<T>(lo, hi);
    reinterpret_cast<uint4*>(s_table)[i] = make_uint4(v, v, v, v);
  }
  if (nested) {
    for (int i = tid; i < 256; i += kMmThreads) s_code8[i] = nested_code[i];
  }
  __syncthreads();

  const float off = nested ? __ldg(offset) : 0.0f;
  const uint32_t* table_lane = s_table + lane;

  float acc[kT][4];
#pragma unroll
  for (int n = 0; n < kT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

  for (int step = warp; step < nsteps; step += kMmWarps) {
    const StepLoads cur = next;
    next = after_next;
    after_next = load(step + 2 * kMmWarps);
    const int k0 = step_k0(step);
    const bool k_ok = k0 < K;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const uint32_t sa = chunk_scale<T>(cur.ra, cur.na, k_ok, nested, s_code8, off);
    const uint32_t sb = chunk_scale<T>(cur.rb, cur.nb, k_ok, nested, s_code8, off);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      // x words 4q .. 4q + 3 (elements k0 + 8q .. k0 + 8q + 7) of each n-tile's token g.
      uint4 xq[kT];
#pragma unroll
      for (int n = 0; n < kT; ++n) {
        const int tok = tok0 + n * 8 + g;
        xq[n] = k_ok && tok < M ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(tok) * K + k0) + q)
                                : zero;
      }
      const uint32_t a_word = word_of(cur.wa, q);
      const uint32_t b_word = word_of(cur.wb, q);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // Sub-step s = 2q + half: bytes 2s, 2s + 1 of the chunk = bytes 2 half, 2 half + 1 of word q.
        const int sh = 16 * half;
        uint32_t a[4];
        a[0] = scale_pair<T>(table_lane[((a_word >> sh) & 0xffu) << 5], sa);
        a[2] = scale_pair<T>(table_lane[((a_word >> (sh + 8)) & 0xffu) << 5], sa);
        a[1] = scale_pair<T>(table_lane[((b_word >> sh) & 0xffu) << 5], sb);
        a[3] = scale_pair<T>(table_lane[((b_word >> (sh + 8)) & 0xffu) << 5], sb);
#pragma unroll
        for (int n = 0; n < kT; ++n) {
          const uint32_t b0 = half ? xq[n].z : xq[n].x;
          const uint32_t b1 = half ? xq[n].w : xq[n].y;
          mma_16816<T>(acc[n], a, b0, b1);
        }
      }
    }
  }

  // Reduce the 8 warps' partial tiles: warp w's accumulator i of lane L at s_red[(w * 4kT + i) * 32 + L].
  __syncthreads();  // the table is no longer read
  float* s_red = reinterpret_cast<float*>(s_table);
#pragma unroll
  for (int n = 0; n < kT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) s_red[(warp * 4 * kT + n * 4 + i) * 32 + lane] = acc[n][i];
  __syncthreads();
  for (int idx = tid; idx < 4 * kT * 32; idx += kMmThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kMmWarps; ++w) sum += s_red[w * 4 * kT * 32 + idx];
    // Accumulator i of n-tile n in lane L: row g (+8 for i >= 2), token 2t + (i & 1).
    const int L = idx & 31;
    const int n = (idx >> 5) / 4;
    const int i = (idx >> 5) & 3;
    const int row = row0 + (L >> 2) + (i >= 2 ? 8 : 0);
    const int tok = tok0 + n * 8 + 2 * (L & 3) + (i & 1);
    if (row < N && tok < M) {
      if (bias != nullptr) sum += to_float(bias[row]);
      out[static_cast<int64_t>(tok) * N + row] = from_float<T>(sum);
    }
  }
}

template <typename T, int kT>
void launch_matmul_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                        const float* nested_absmax, const float* nested_code, const float* offset,
                        const T* bias, at::Tensor& out, int M, int N, int K, int lg_bs, int lg_nbs,
                        QuantType qt, bool nested) {
  const int64_t token_tiles = ceil_div(M, kT * 8);
  TORCH_CHECK(token_tiles <= 65535, "x: expected at most ", num(65535 * kT * 8), " rows, got ", num(M));
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kTileRows)), static_cast<unsigned>(token_tiles));
  matmul_4bit_kernel<T, kT><<<grid, kMmThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), packed.data_ptr<uint8_t>(), absmax.data_ptr(),
      nested_absmax, nested_code, offset, bias, reinterpret_cast<T*>(out.data_ptr()), M, N, K,
      lg_bs, lg_nbs, static_cast<int>(qt), nested);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor matmul_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                       int64_t blocksize, c10::string_view quant_type, int64_t N,
                       const std::optional<at::Tensor>& nested_absmax,
                       const std::optional<at::Tensor>& nested_code,
                       const std::optional<at::Tensor>& offset, int64_t nested_blocksize,
                       const std::optional<at::Tensor>& bias) {
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
  check_operand(packed, "packed", x, "x");
  check_dtype(packed, "packed", at::kByte);
  TORCH_CHECK(is_aligned16(packed.data_ptr()), "packed: expected a tensor starting on a 16-byte boundary");
  check_operand(absmax, "absmax", x, "x");
  TORCH_CHECK(N > 0, "N: expected > 0, got ", num(N));
  TORCH_CHECK(N * K < (int64_t{1} << 40) && M < (int64_t{1} << 31) && N < (int64_t{1} << 31),
              "x, N: sizes out of range");
  const int lg_bs = log2_blocksize(blocksize, "blocksize");
  const QuantType qt = parse_quant_type(quant_type);
  check_numel(packed, "packed", N * K / 2, "N * K / 2 bytes");
  const int64_t nblocks = ceil_div(N * K, blocksize);
  check_numel(absmax, "absmax", nblocks, "ceil(N * K / blocksize)");

  const bool nested = nested_absmax.has_value();
  TORCH_CHECK(nested_code.has_value() == nested && offset.has_value() == nested,
              "nested_absmax, nested_code, offset: expected all three (double quant) or none");
  int lg_nbs = 0;
  if (nested) {
    check_dtype(absmax, "absmax", at::kByte);
    lg_nbs = log2_blocksize(nested_blocksize, "nested_blocksize");
    check_operand(*nested_absmax, "nested_absmax", x, "x");
    check_dtype(*nested_absmax, "nested_absmax", at::kFloat);
    check_numel(*nested_absmax, "nested_absmax", ceil_div(nblocks, nested_blocksize),
                "ceil(absmax.numel() / nested_blocksize)");
    check_operand(*nested_code, "nested_code", x, "x");
    check_dtype(*nested_code, "nested_code", at::kFloat);
    check_numel(*nested_code, "nested_code", 256, "the 8-bit code");
    check_operand(*offset, "offset", x, "x");
    check_dtype(*offset, "offset", at::kFloat);
    check_numel(*offset, "offset", 1, "a scalar");
  } else {
    check_dtype(absmax, "absmax", at::kFloat);
  }
  if (bias.has_value()) {
    check_operand(*bias, "bias", x, "x");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias: expected dtype ", x.scalar_type(),
                " (x's), got ", bias->scalar_type());
    check_numel(*bias, "bias", N, "N");
  }

  const c10::cuda::CUDAGuard guard(x.device());
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  TORCH_CHECK(major >= 8, "x: the fused 4-bit matmul needs a GPU of compute capability 8.0 or newer "
              "(bf16/fp16 tensor-core MMA); qlora_kernels.matmul_4bit takes the dequantize path on older GPUs");
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const float* na = nested ? nested_absmax->data_ptr<float>() : nullptr;
  const float* nc = nested ? nested_code->data_ptr<float>() : nullptr;
  const float* off = nested ? offset->data_ptr<float>() : nullptr;
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* b = bias.has_value() ? reinterpret_cast<const T*>(bias->data_ptr()) : nullptr;
    const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
    // Fewest n-tiles that hold M tokens (beyond 64 tokens, more CTAs along y).
    if (M <= 8) {
      launch_matmul_4bit<T, 1>(x, packed, absmax, na, nc, off, b, out, m, n, k, lg_bs, lg_nbs, qt, nested);
    } else if (M <= 16) {
      launch_matmul_4bit<T, 2>(x, packed, absmax, na, nc, off, b, out, m, n, k, lg_bs, lg_nbs, qt, nested);
    } else if (M <= 32) {
      launch_matmul_4bit<T, 4>(x, packed, absmax, na, nc, off, b, out, m, n, k, lg_bs, lg_nbs, qt, nested);
    } else {
      launch_matmul_4bit<T, 8>(x, packed, absmax, na, nc, off, b, out, m, n, k, lg_bs, lg_nbs, qt, nested);
    }
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(TypeTag<__nv_bfloat16>{});
  } else {
    run(TypeTag<__half>{});
  }
  return out;
}

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("matmul_4bit", &qlora_kernels::matmul_4bit);
}
