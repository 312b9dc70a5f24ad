// The 4-bit GEMM for many tokens (prefill, training), sm_90a: out[M, N] = x[M, K] @ W[N, K]^T
// (+ bias) (+ accumulate), W in bitsandbytes' 4-bit layout, read as 4 bits and decoded in
// registers into the tensor cores' A operand. No dequantized W in memory.
//
// Why: at hundreds to thousands of tokens the layer is bound by arithmetic, and the other way,
// dequantize_4bit into a 16-bit buffer and then cuBLAS, writes and reads back 2 bytes per weight
// for nothing: 8192 x 22016 at 4096 tokens spent ~155 us of ~2.1 ms in the dequantize (H100).
//
// How (one CTA per tile of 128 weight rows x 256 tokens, or x 128 where 256-token tiles would leave
// most SMs idle (gemm_tile_tokens; the template parameter kTokens), walking K in steps of 64):
// * D^T = W . x^T: the weight is wgmma's A operand (64 rows per consumer warpgroup, from
//   registers), x the B operand (the tile's tokens, from shared memory). A register A operand has the
//   mma.sync m16n8k16 layout: lane (g = lane / 4, t = lane % 4) of warp w holds rows 16 w + g and
//   + 8, columns 2t, 2t + 1 and 2t + 8, 2t + 9 of each 16-column slice s. In packed W those are
//   the high and low nibble of byte 8 s + t and of byte 8 s + t + 4: byte t of the 4-byte words
//   2 s and 2 s + 1 of the row's 32 bytes of the step. So each lane loads its two rows' 32 bytes
//   (two 16-byte shared loads a row, the 4 lanes of a row reading the same addresses) and looks
//   up byte t of every word: a byte permute, a shift-or and one shared load from the byte -> pair
//   table (decode_4bit.cuh), then one HMUL2 by the row's absmax. A 64-element step is one absmax
//   block (blocksize a multiple of 64), so a row has one scale a step.
// * x comes as a (tokens) x 64 box by the TMA in the 128-byte swizzle that wgmma's descriptor reads;
//   the packed weight as a 128 x 32-byte box. A producer warp keeps kGemmStages steps in flight
//   (mbarriers full / empty); the two consumer warpgroups decode step k + 1 while the wgmmas of
//   step k run (A registers double-buffered, wgmma.wait_group 1).
// * The epilogue stages the float32 tile in shared memory (the stages' memory, free by then) and
//   writes each token's 128 outputs as 16-byte stores, adding the bias and `accumulate` (an
//   in-place gemm_4bit_add_'s output) in float32 before the one rounding, as cuBLAS' beta = 1 does.
// * gemm_4bit_lora (kLora): the LoRA term scale * xa @ B.T is ceil(r / 64) extra steps before K's:
//   xa's columns come as the x stage, B's rows as the A registers (lora_step_registers), so the
//   accumulator starts with the LoRA term and nothing is read back in the epilogue.
// * Near the end of K each thread prefetches its epilogue's accumulate rows into L2.
// Numerics: the decoded weight is code * absmax rounded to x's type, as in matmul_4bit.cu (the
// code value and the absmax each rounded to it first); sums in float32.
// The transposed instantiation (gemm_4bit_dx, gemm_4bit_add_ with transposed): out[M, K] = x[M, N]
// @ W, the backward's dX = dY @ W, with W as the reduction side; see decode_step_transposed.
// Where it stands (H100, see kGemmMaxTokens and kGemmDxMaxTokens): 3-12% slower than cuBLAS on a
// bf16 W at 4096-8192 tokens. Left for later: persistent CTAs that overlap a tile's epilogue with
// the next one's main loop.
#include <torch/library.h>

#include <cuda.h>
#include <cudaTypedefs.h>

#include "common.cuh"
#include "decode_4bit.cuh"
#include "quant_4bit.h"
#include "tma.cuh"

// The 128 float32 accumulators of one m64n256 wgmma per thread, as asm operands %0 .. %127.
#define QK_WGMMA_D_REGS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define QK_WGMMA_D_OPERANDS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// The same for m64n128k16: 64 accumulators, %0 .. %63.
#define QK_WGMMA_D64_REGS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

#define QK_WGMMA_D64_OPERANDS \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

namespace qlora_kernels {
namespace {

// Tokens per CTA tile (the wgmma's N): 256, or 128 where 256-token tiles would leave SMs idle
// (gemm_tile_tokens); the kernel's template parameter kTokens.
constexpr int kGemmTokens = 256;
constexpr int kGemmTokensSmall = 128;
constexpr int kGemmRows = 128;    // weight rows per CTA tile: 2 consumer warpgroups x 64
constexpr int kGemmStepK = 64;    // K per stage: one absmax block of 64 (or part of a larger one)
// Stages in flight: on an H100 five were slower than four on 5 of the 7 LLaMA layers at 4096
// tokens (by up to 3%), the others within 1%.
constexpr int kGemmStages = 4;
constexpr int gemm_x_bytes(int tokens) { return tokens * kGemmStepK * 2; }  // 32 KB a stage (16 KB)
constexpr int kGemmWBytes = kGemmRows * kGemmStepK / 2;    // 4 KB a stage
constexpr int kGemmConsumers = 256;                        // two warpgroups
constexpr int kGemmThreads = kGemmConsumers + 128;         // + the producer warpgroup (one lane of it copies)
// The staged output tile: a token's 128 float32 outputs, padded by 4 so that the accumulator
// stores (lanes t 0..3 two tokens apart, g 0..7 one row apart) fall in 32 different banks.
constexpr int kGemmOutPitch = kGemmRows + 4;
constexpr int gemm_stage_area(int tokens) { return kGemmStages * (gemm_x_bytes(tokens) + kGemmWBytes); }
// The transposed kernel's scale stages (x @ W, W the reduction side): a step's 64 rows x the
// tile's two 64-column groups of scales, in x's 16-bit type.
constexpr int kGemmScaleBytes = 2 * kGemmStepK * 2;
constexpr int gemm_smem(int tokens) {
  return gemm_stage_area(tokens) + kTableBytes + 256 * 4 + kGemmStages * kGemmScaleBytes + 2 * kGemmStages * 8;
}
static_assert((gemm_stage_area(kGemmTokens) + kTableBytes + 256 * 4) % 128 == 0 &&
                  (gemm_stage_area(kGemmTokensSmall) + kTableBytes + 256 * 4) % 128 == 0,
              "the scale stages start on 128 bytes");
static_assert(kGemmTokens * kGemmOutPitch * 4 <= gemm_stage_area(kGemmTokens) &&
                  kGemmTokensSmall * kGemmOutPitch * 4 <= gemm_stage_area(kGemmTokensSmall),
              "the staged output tile fits in the stages");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// One wgmma with a register A operand: SHAPE (m64n256k16 / m64n128k16), AB the inputs' type (bf16,
// f16), D_REGS the accumulators' operand list, A_DESC the operands of a0..a3 and of the descriptor.
#define QK_WGMMA_REGISTER_A(SHAPE, AB, D_REGS, A_DESC)                                             \
  "{\n.reg .pred p;\nsetp.eq.u32 p, 1, 1;\n"                                                     \
  "wgmma.mma_async.sync.aligned." SHAPE ".f32." AB "." AB " {" D_REGS "}, " A_DESC ", p, 1, 1, 0;\n}\n"

// d += a (four registers: the m64k16 A operand) x B (k16 x 256 tokens in shared memory at desc).
template <typename T>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint64_t desc) {
#define QK_A_DESC "{%128, %129, %130, %131}, %132"
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(QK_WGMMA_REGISTER_A("m64n256k16", "bf16", QK_WGMMA_D_REGS, QK_A_DESC)
                 : QK_WGMMA_D_OPERANDS : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
  else
    asm volatile(QK_WGMMA_REGISTER_A("m64n256k16", "f16", QK_WGMMA_D_REGS, QK_A_DESC)
                 : QK_WGMMA_D_OPERANDS : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
#undef QK_A_DESC
}
// The same with 128 tokens (64 accumulators).
template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint64_t desc) {
#define QK_A_DESC "{%64, %65, %66, %67}, %68"
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile(QK_WGMMA_REGISTER_A("m64n128k16", "bf16", QK_WGMMA_D64_REGS, QK_A_DESC)
                 : QK_WGMMA_D64_OPERANDS : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
  else
    asm volatile(QK_WGMMA_REGISTER_A("m64n128k16", "f16", QK_WGMMA_D64_REGS, QK_A_DESC)
                 : QK_WGMMA_D64_OPERANDS : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
#undef QK_A_DESC
}
template <typename T, int kTokens>
__device__ __forceinline__ void wgmma_tile_k16(float (&d)[kTokens / 2], uint32_t a0, uint32_t a1, uint32_t a2,
                                               uint32_t a3, uint64_t desc) {
  if constexpr (kTokens == 256) {
    wgmma_m64n256k16<T>(d, a0, a1, a2, a3, desc);
  } else {
    static_assert(kTokens == 128, "token tiles of 256 or 128");
    wgmma_m64n128k16<T>(d, a0, a1, a2, a3, desc);
  }
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps registers read by an in-flight wgmma alive and unchanged up to here (after its wait).
template <int kN>
__device__ __forceinline__ void hold(uint32_t (&r)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+r"(r[i])::"memory");
}
// Shared-memory matrix descriptor of a K-major operand in the 128-byte swizzle: 8-row groups
// 1024 bytes apart (the stride), the leading offset unused (1).
__device__ __forceinline__ uint64_t swizzle128_descriptor(const void* p) {
  const uint64_t address = shared_address(p);
  return ((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 62);
}
__device__ __forceinline__ void gemm_consumer_sync() {
  asm volatile("bar.sync 1, %0;" ::"n"(kGemmConsumers) : "memory");
}

// The 16 A registers of one step for this lane (4 slices x a0..a3), from its rows' 32 bytes at
// w_lo and w_hi: byte t of words 2s, 2s + 1, through the table, times the rows' scale pairs.
template <typename T>
__device__ __forceinline__ void decode_step(uint32_t (&a)[16], const uint8_t* w_lo, const uint8_t* w_hi,
                                            const PairLookup& entry, uint32_t byte_t, uint32_t s_lo, uint32_t s_hi) {
  const uint4 l0 = *reinterpret_cast<const uint4*>(w_lo), l1 = *reinterpret_cast<const uint4*>(w_lo + 16);
  const uint4 h0 = *reinterpret_cast<const uint4*>(w_hi), h1 = *reinterpret_cast<const uint4*>(w_hi + 16);
  const uint32_t lo[8] = {l0.x, l0.y, l0.z, l0.w, l1.x, l1.y, l1.z, l1.w};
  const uint32_t hi[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
  // byte t of a word at its table offset (byte << 7)
  auto pair = [&](uint32_t word) { return entry(__byte_perm(word, 0, byte_t) << 7); };
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    a[4 * s + 0] = scale_pair<T>(pair(lo[2 * s]), s_lo);
    a[4 * s + 1] = scale_pair<T>(pair(hi[2 * s]), s_hi);
    a[4 * s + 2] = scale_pair<T>(pair(lo[2 * s + 1]), s_lo);
    a[4 * s + 3] = scale_pair<T>(pair(hi[2 * s + 1]), s_hi);
  }
}

// The transposed kernel's 16 A registers of one step (x @ W: the A operand is W^T, its k W's
// rows). Register a[4 s + 2 h + e] pairs W's rows n, n + 1 (n = 16 s + 8 h + 2 t) at one column.
//
// The tile's 128 accumulator rows are W's columns in an order chosen for the loads: warp w and lane
// g own byte 2 g + (w & 1) of the 16-byte column chunk w / 2 (columns 32 (w / 2) + 4 g + 2 (w & 1)
// + e; e = 0 the byte's high nibble, accumulator row g, e = 1 the low one, row g + 8). Then
// ldmatrix.trans hands each lane, from 8 rows x 16 bytes, a word with 2 bytes of row n (low half)
// and of row n + 1 (high half) at its b16 column g: two ldmatrix.x4 load a warp's whole step
// (16 LDS.64 otherwise). The byte pairs' nibbles form the table index (n's << 4) | n + 1's. The
// weight stage is in the 64-byte swizzle (16-byte chunk ^= (row / 2) % 4), so that the 8 rows of an
// ldmatrix phase fall in different banks. The epilogue puts the columns back in order.
//
// Scales: the stage holds, per 64-column group, the 64 rows' scales ordered so that lane t's 8 pairs
// (s, h) are 32 contiguous bytes (scale_table_kernel writes that order): two LDS.128.
template <typename T>
__device__ __forceinline__ void decode_step_transposed(uint32_t (&a)[16], uint32_t w_lane_address,
                                                       const T* s_lane, uint32_t byte_shift,
                                                       const PairLookup& entry) {
  uint32_t m[8];
#pragma unroll
  for (int q = 0; q < 2; ++q)  // rows 32 q .. 32 q + 31: matrices (s, h) = (2 q, 0), (2 q, 1), (2 q + 1, 0), ..
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(m[4 * q]), "=r"(m[4 * q + 1]), "=r"(m[4 * q + 2]), "=r"(m[4 * q + 3])
                 : "r"(w_lane_address + 2048u * q)
                 : "memory");
  const uint4 s0 = *reinterpret_cast<const uint4*>(s_lane), s1 = *reinterpret_cast<const uint4*>(s_lane + 8);
  const uint32_t sc[8] = {s0.x, s0.y, s0.z, s0.w, s1.x, s1.y, s1.z, s1.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) {  // i = 2 s + h
    const uint32_t v = m[i] >> byte_shift;  // row n's byte in bits 0..7, row n + 1's in 16..23
    const uint32_t hi = v & 0x00F000F0u, lo = v & 0x000F000Fu;
    // table offset (nibble_n << 4 | nibble_n1) << 7
    a[2 * i] = scale_pair<T>(entry(((hi << 7) | (hi >> 13)) & 0x7F80u), sc[i]);
    a[2 * i + 1] = scale_pair<T>(entry(((lo << 11) | (lo >> 9)) & 0x7F80u), sc[i]);
  }
}

// The 16 A registers of a LoRA step (gemm_4bit_lora): lora_scale * B [N, rank] at this lane's rows
// n (= row0 + r_lo) and n + 8, columns c0 + 16 s + 2 t (+ 8), in the layout decode_step gives (the
// pair at the lower column in the low half). B is small and shared by every token tile, so its rows
// come from L2 with 4-byte loads (rank % 8 == 0: aligned). Rows past N and columns past rank are
// zeros: xa's columns past rank are zero-filled by the TMA, but 0 x garbage could be NaN. The scale
// is applied here, rounded to T with each element: in bf16 exact for a power of two (as alpha / r
// usually is), otherwise one rounding of s * B, like the rounding of B itself; fp16 comes here only
// with a scale that keeps s * B exact (gemm_4bit_lora).
template <typename T>
__device__ __forceinline__ void lora_step_registers(uint32_t (&a)[16], const T* __restrict__ lora_b, int n, int N,
                                                    int rank, int c0, int t, float lora_scale) {
  const uint32_t* row_lo = reinterpret_cast<const uint32_t*>(lora_b + static_cast<int64_t>(min(n, N - 1)) * rank);
  const uint32_t* row_hi = reinterpret_cast<const uint32_t*>(lora_b + static_cast<int64_t>(min(n + 8, N - 1)) * rank);
  auto scaled = [&](uint32_t v) {
    typename Pair<T>::type p;
    memcpy(&p, &v, sizeof(v));
    return pack2<T>(to_float(p.x) * lora_scale, to_float(p.y) * lora_scale);
  };
#pragma unroll
  for (int s = 0; s < 4; ++s)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int c = c0 + 16 * s + 8 * h + 2 * t;  // even, so c < rank covers c + 1 (rank is even)
      a[4 * s + 2 * h] = c < rank && n < N ? scaled(__ldg(row_lo + c / 2)) : 0u;
      a[4 * s + 2 * h + 1] = c < rank && n + 8 < N ? scaled(__ldg(row_hi + c / 2)) : 0u;
    }
}
#endif

// See the top of the file. Grid: one CTA per tile (1-D, in the tile order below). Rows past N and
// tokens past M are read as zeros (the TMA fills a box past the tensor's end) and never stored.
// kTransposed: out = x @ W (x [M, N_w], W [N_w, K_w]; the backward's dX = dY @ W): the tile's 128
// output features are W's columns, K is W's rows, and the scales come by s_map (see
// decode_step_transposed). In that mode N and K below are K_w and N_w.
template <typename T, bool kTransposed, int kTokens, bool kLora>
__global__ void __launch_bounds__(kGemmThreads, 1)
    gemm_4bit_kernel(const __grid_constant__ CUtensorMap x_map, const __grid_constant__ CUtensorMap w_map,
                     const __grid_constant__ CUtensorMap s_map, const __grid_constant__ CUtensorMap xa_map,
                     const T* __restrict__ lora_b, int rank, int num_lora_steps, float lora_scale,
                     const void* __restrict__ absmax, const float* __restrict__ nested_absmax,
                     const float* __restrict__ nested_code, const float* __restrict__ offset,
                     // accumulate may be out itself (gemm_4bit_add_): no __restrict__ on those two
                     const T* __restrict__ bias, const T* accumulate, T* out, int M, int N,
                     int K, int lg_bs, int lg_nbs, int quant_type, bool nested, bool vector_out, int group) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // The dynamic shared memory starts on 1024 bytes (the 128-byte swizzle's period) as declared;
  // a build where it did not would compute garbage, so it stops instead. (Aligning at run time
  // made the compiler add the offset to every table lookup.)
  extern __shared__ __align__(1024) uint8_t smem[];
  if (threadIdx.x == 0 && (shared_address(smem) & 1023u) != 0) __trap();
  uint8_t* s_x = smem;
  constexpr int kXBytes = gemm_x_bytes(kTokens);
  uint8_t* s_w = smem + kGemmStages * kXBytes;
  uint8_t* s_table = smem + gemm_stage_area(kTokens);
  float* s_code8 = reinterpret_cast<float*>(s_table + kTableBytes);
  // kTransposed: kGemmStages x 2 x 64 scales, on 128 bytes as tensor copies want
  T* s_scales = reinterpret_cast<T*>(s_code8 + 256);
  uint64_t* full = reinterpret_cast<uint64_t*>(reinterpret_cast<uint8_t*>(s_scales) + kGemmStages * kGemmScaleBytes);
  uint64_t* empty = full + kGemmStages;

  // LoRA steps (gemm_4bit_lora) come first in the step sequence. A kernel without them is its own
  // instantiation: the runtime check in every step made the forward's main loop 1.5% slower
  // (8192 x 8192 at 4096 tokens, H100).
  static_assert(!(kLora && kTransposed), "LoRA steps in the forward kernel only");
  const int lora_steps = kLora ? num_lora_steps : 0;
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);
  // Tile order: CTAs in launch order walk `group` token tiles for each row tile, then the next
  // row tile, so that the CTAs running at once share both their weight and their x tiles in L2.
  const int token_tiles = (M + kTokens - 1) / kTokens;
  const int row_tiles = (N + kGemmRows - 1) / kGemmRows;
  const int tiles_in_group = group * row_tiles;
  const int id = static_cast<int>(blockIdx.x);
  const int first_token_tile = id / tiles_in_group * group;
  const int group_size = min(token_tiles - first_token_tile, group);
  const int tok0 = (first_token_tile + id % tiles_in_group % group_size) * kTokens;
  const int row0 = id % tiles_in_group / group_size * kGemmRows;
  const int nsteps = (K + kGemmStepK - 1) / kGemmStepK;  // K % 64 == 0 but in the transposed mode
  if (tid == 0) {
    for (int i = 0; i < kGemmStages; ++i) {
      mbarrier_init(&full[i], 1);   // the producer's arrive, plus the stage's bytes
      mbarrier_init(&empty[i], 8);  // one arrive per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp >= kGemmConsumers / 32) {
    // The producer warpgroup gives its registers to the consumers; one lane issues the copies.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp == kGemmConsumers / 32 && lane == 0) {
      uint64_t policy;
      asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(policy));
      for (int i = 0; i < lora_steps + nsteps; ++i) {
        const int slot = i % kGemmStages;
        if (i >= kGemmStages) {
          mbarrier_wait(&empty[slot], ((i / kGemmStages) & 1) ^ 1);
          fence_reads_before_async_copy();  // the consumers read the weight stage through the generic proxy
        }
        if (i < lora_steps) {  // a LoRA step: 64 columns of xa only (B's rows come from global memory)
          mbarrier_expect_bytes(&full[slot], kXBytes);
          tensor_copy_2d(s_x + slot * kXBytes, &xa_map, i * kGemmStepK, tok0, &full[slot], policy);
          continue;
        }
        const int step = i - lora_steps;
        mbarrier_expect_bytes(&full[slot], kXBytes + kGemmWBytes + (kTransposed ? kGemmScaleBytes : 0));
        tensor_copy_2d(s_x + slot * kXBytes, &x_map, step * kGemmStepK, tok0, &full[slot], policy);
        if constexpr (kTransposed) {
          // W's rows step * 64 .. as 64 rows x the tile's 64 bytes (128 columns), and their scales
          tensor_copy_2d(s_w + slot * kGemmWBytes, &w_map, row0 / 2, step * kGemmStepK, &full[slot], policy);
          tensor_copy_2d(s_scales + slot * kGemmScaleBytes / 2, &s_map, step * kGemmStepK, row0 / kGemmStepK,
                         &full[slot], policy);
        } else {
          tensor_copy_2d(s_w + slot * kGemmWBytes, &w_map, step * kGemmStepK / 2, row0, &full[slot], policy);
        }
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  build_pair_table<T>(s_table, quant_type, tid, kGemmConsumers);
  load_code8(s_code8, nested_code, nested, tid, kGemmConsumers);
  gemm_consumer_sync();

  const int g = lane >> 2;
  const int t = lane & 3;
  const int r_lo = warp * 16 + g;  // this lane's rows in the tile: r_lo and r_lo + 8
  const PairLookup entry{s_table, 4u * lane};
  const uint32_t byte_t = 0x4440u | t;  // __byte_perm selector: byte t of a word, zero above
  // Each row's absmax block at step s: (n K + 64 s) >> lg_bs, in 32 bits from the row's start
  // (the host checks the block count fits in 31 bits). Rows past N read row N - 1's.
  const RowStart lo_row = row_start(nullptr, min(row0 + r_lo, N - 1), K, lg_bs);
  const RowStart hi_row = row_start(nullptr, min(row0 + r_lo + 8, N - 1), K, lg_bs);
  const float off = nested && !kTransposed ? __ldg(offset) : 0.0f;
  // The raw absmax of the next step, loaded one step ahead of its use (not in the transposed
  // mode: its scales come with the stage).
  ScaleLoads raw = load_scales(lo_row, hi_row, 0, !kTransposed, absmax, nested, nested_absmax, lg_bs, lg_nbs);
  auto scales = [&](int step, uint32_t& s_lo, uint32_t& s_hi) {
    s_lo = chunk_scale<T>(raw.ra, raw.na, true, nested, s_code8, off);
    s_hi = chunk_scale<T>(raw.rb, raw.nb, true, nested, s_code8, off);
    raw = load_scales(lo_row, hi_row, (step + 1) * kGemmStepK, step + 1 < nsteps, absmax, nested, nested_absmax,
                      lg_bs, lg_nbs);
  };
  float d[kTokens / 2];
#pragma unroll
  for (int i = 0; i < kTokens / 2; ++i) d[i] = 0.0f;
  uint32_t a_even[16], a_odd[16];  // the A registers of even and odd steps
  // kTransposed (see decode_step_transposed): this lane's ldmatrix row (lane) in the swizzled stage,
  // in its warp's 16-byte column chunk; its byte of the b16 it receives; its 32 bytes of scales
  const uint32_t w_lane_offset = 64u * lane + ((((warp >> 1) ^ (lane >> 1)) & 3u) << 4);
  const uint32_t byte_shift = 8u * (warp & 1);
  const int scale_lane_offset = (warp >> 2) * kGemmStepK + 16 * t;
  // Unified step i: LoRA steps first (i < lora_steps), then K's steps (step = i - lora_steps);
  // slot and phase follow i, as in the producer.
  auto load = [&](int i, uint32_t (&a)[16]) {
    const int slot = i % kGemmStages;
    if (i < lora_steps) {
      // B's registers come from global memory (L2), so they are loaded before the wait for xa
      lora_step_registers<T>(a, lora_b, row0 + r_lo, N, rank, i * kGemmStepK, t, lora_scale);
      mbarrier_wait(&full[slot], (i / kGemmStages) & 1);
      return;
    }
    const int step = i - lora_steps;
    mbarrier_wait(&full[slot], (i / kGemmStages) & 1);
    const uint8_t* w = s_w + slot * kGemmWBytes;
    if constexpr (kTransposed) {
      decode_step_transposed<T>(a, shared_address(w) + w_lane_offset,
                                s_scales + slot * kGemmScaleBytes / 2 + scale_lane_offset, byte_shift, entry);
    } else {
      uint32_t s_lo, s_hi;
      scales(step, s_lo, s_hi);
      decode_step<T>(a, w + r_lo * 32, w + (r_lo + 8) * 32, entry, byte_t, s_lo, s_hi);
    }
  };
  auto issue = [&](int step, uint32_t (&a)[16]) {
    const uint64_t desc = swizzle128_descriptor(s_x + (step % kGemmStages) * kXBytes);
    wgmma_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s)
      wgmma_tile_k16<T, kTokens>(d, a[4 * s], a[4 * s + 1], a[4 * s + 2], a[4 * s + 3], desc + 2 * s);
    wgmma_commit();
  };
  // step's x and weights are no longer read: its wgmmas are done (waited for) and its weight
  // bytes are in registers
  auto release = [&](int step) {
    __syncwarp();
    if (lane == 0) mbarrier_arrive(&empty[step % kGemmStages]);
  };
  // Step k + 1 is decoded while the wgmmas of step k run; then k's are waited for (one group
  // stays in flight) and its stage released.
  load(0, a_even);
  issue(0, a_even);
  int step = 0;
  // Near the end of K, each consumer thread asks L2 for the accumulate rows of the token its
  // epilogue starts with (one thread a token, 2 lines of 128 bytes each), so that the
  // epilogue's loads of it do not wait for DRAM.
  const int total = lora_steps + nsteps;
  const int prefetch_step = max(0, total - 8);
  auto prefetch_accumulate = [&] {
    const int tok = tok0 + tid;
    if (accumulate != nullptr && tid < kTokens && tok < M)
      for (int n = row0; n < min(row0 + kGemmRows, N); n += 64) prefetch_l2(accumulate + static_cast<int64_t>(tok) * N + n);
  };
  for (; step + 2 < total; step += 2) {
    if (step == (prefetch_step & ~1)) prefetch_accumulate();
    load(step + 1, a_odd);
    issue(step + 1, a_odd);
    wgmma_wait<1>();
    hold(a_even);
    release(step);
    load(step + 2, a_even);
    issue(step + 2, a_even);
    wgmma_wait<1>();
    hold(a_odd);
    release(step + 1);
  }
  if (total <= 2) prefetch_accumulate();
  if (step + 1 < total) {
    load(step + 1, a_odd);
    issue(step + 1, a_odd);
    wgmma_wait<1>();
    hold(a_even);
    release(step);
    ++step;
  }
  wgmma_wait<0>();
  hold(a_even);
  hold(a_odd);
  release(step);

  // Epilogue: accumulator 4 j + i of this lane is row r_lo (+ 8 for i >= 2), token 8 j + 2 t + (i & 1).
  gemm_consumer_sync();  // every consumer's wgmmas are done: the stages' memory is free
  float* s_out = reinterpret_cast<float*>(smem);
  if constexpr (kTransposed) {
    // accumulator rows r_lo and r_lo + 8 are the adjacent columns col, col + 1 (decode_step_transposed)
    const int col = 32 * (warp >> 1) + 4 * g + 2 * (warp & 1);
#pragma unroll
    for (int j = 0; j < kTokens / 8; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i)
        *reinterpret_cast<float2*>(s_out + (8 * j + 2 * t + i) * kGemmOutPitch + col) =
            make_float2(d[4 * j + i], d[4 * j + i + 2]);
  } else {
#pragma unroll
    for (int j = 0; j < kTokens / 8; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) s_out[(8 * j + 2 * t + (i & 1)) * kGemmOutPitch + r_lo + (i >= 2 ? 8 : 0)] = d[4 * j + i];
  }
  gemm_consumer_sync();
  // 8 outputs (16 bytes) a thread at a time, 16 threads a token: chunk c of the tile is token
  // c / 16, rows 8 (c % 16) ..; this thread's are c = tid + 256 i.
  constexpr int kChunksPerToken = kGemmRows / 8;
  constexpr int kChunks = kTokens * kChunksPerToken / kGemmConsumers;  // 16 a thread (8)
  auto chunk_at = [&](int i, int& tok, int& n, const float*& src) {
    const int c = tid + kGemmConsumers * i;
    tok = tok0 + c / kChunksPerToken;
    n = row0 + (c % kChunksPerToken) * 8;
    src = s_out + (c / kChunksPerToken) * kGemmOutPitch + (c % kChunksPerToken) * 8;
  };
  if (vector_out) {  // N % 8 == 0 and 16-byte aligned bias / accumulate (the host checked)
    // all of this thread's accumulate loads first, then the sums: 16 loads in flight, not one
    uint4 acc[kChunks];
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      int tok, n;
      const float* src;
      chunk_at(i, tok, n, src);
      acc[i] = accumulate != nullptr && tok < M && n < N
                   ? *reinterpret_cast<const uint4*>(accumulate + static_cast<int64_t>(tok) * N + n)
                   : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      int tok, n;
      const float* src;
      chunk_at(i, tok, n, src);
      if (tok >= M || n >= N) continue;
      const float4 v0 = *reinterpret_cast<const float4*>(src), v1 = *reinterpret_cast<const float4*>(src + 4);
      const float v[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
      T b[8], a[8], r[8];
      if (bias != nullptr) *reinterpret_cast<uint4*>(b) = __ldg(reinterpret_cast<const uint4*>(bias + n));
      *reinterpret_cast<uint4*>(a) = acc[i];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        float sum = v[e];
        if (bias != nullptr) sum += to_float(b[e]);
        if (accumulate != nullptr) sum += to_float(a[e]);
        r[e] = from_float<T>(sum);
      }
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(tok) * N + n) = *reinterpret_cast<const uint4*>(r);
    }
  } else {
    for (int i = 0; i < kChunks; ++i) {
      int tok, n;
      const float* src;
      chunk_at(i, tok, n, src);
      const int64_t o = static_cast<int64_t>(tok) * N + n;
      for (int e = 0; e < 8 && tok < M && n + e < N; ++e) {
        float sum = src[e];
        if (bias != nullptr) sum += to_float(bias[n + e]);
        if (accumulate != nullptr) sum += to_float(accumulate[o + e]);
        out[o + e] = from_float<T>(sum);
      }
    }
  }
#endif
}

// Whether gemm_4bit_kernel (for x's dtype) can run on this device, with its shared memory limit
// raised: compiled for sm_90a (setup.py builds compute capability 9.0 as 9.0a), the device is 9.0
// (sm_90a code runs there only), this build's code for it is sm_90 (not PTX of an older one) and
// the driver encodes tensor maps.
bool gemm_kernel_usable(const void* kernel, int smem, int device) {
#if defined(QLORA_KERNELS_SM90A)
  return compute_capability_major(device) == 9 &&
         device_attribute(device, cudaDevAttrComputeCapabilityMinor) == 0 &&
         sm90_ctas_per_sm(kernel, kGemmThreads, smem, device) > 0 && tensor_map_encoder() != nullptr;
#else
  (void)kernel;
  (void)smem;
  (void)device;
  return false;
#endif
}

// Where the kernel beats dequantize + cuBLAS (H100, bf16, NF4 + double quant, the LLaMA layers
// from 4096 x 4096 to 28672 x 8192, median of interleaved rounds; benchmarks/results/
// NVIDIA-H100-80GB-HBM3/gemm_4bit_vs_dequantize.txt):
// * up to 2048 tokens by 1-35% (the dequantize pass is a large share of a small GEMM: 8192 x
//   8192 at 512 tokens 110 against 170 us), when the problem has tiles for enough SMs (see
//   gemm_tile_tokens; 128-token tiles where 256-token ones would leave most SMs idle);
// * at 4096 tokens it is even on average (0.96-1.05 by layer), and it needs no 16-bit W buffer;
// * at 8192 tokens cuBLAS' faster main loop wins (1.02-1.05): dequantize + cuBLAS there.
constexpr int64_t kGemmMaxTokens = 4096;
// gemm_4bit_dx (x @ W, the backward's dX) against dequantize + cuBLAS, the same layers: 0.69-0.74
// on the 65B-sized layers at 512 tokens, 0.95-1.00 at 2048, 1.01-1.04 at 4096 (its steps decode
// more than the forward's: ldmatrix + scale loads for row pairs; gemm_4bit_vs_dequantize.txt).
// In the training layer (forward + backward) it paid up to 1024 tokens (0.83-1.00x the time at
// 512, 0.94-1.00x at 1024); at 2048 the layer read 1-3% slower on the 7B shapes and a 7B training
// step at 4 x 512 tokens 1.2% slower, against the 4-5% its GEMM alone gained: taken up to 1024.
constexpr int64_t kGemmDxMaxTokens = 1024;
// The token tile for M tokens x N outputs (a reduction of `reduction`), or 0 for dequantize +
// cuBLAS. Measured on an H100 (CUDA-graph replay, the LLaMA 7B and 65B layers at 256-1024 tokens;
// tile_vs_dequantize_small_m.txt in benchmarks/results/NVIDIA-H100-80GB-HBM3):
// * 256-token tiles from half as many tiles as SMs: at 86 tiles (11008 x 4096 at 256 tokens)
//   0.56x (forward) and 0.68x (dX, 4096 x 11008) the time of dequantize + cuBLAS, whose
//   dequantize pass is a large share of a small GEMM.
// * below that, 128-token tiles, which fill twice as many SMs: forward 0.60-0.95x from 64 such
//   tiles; dX 0.68-0.90x with ~one per SM and a reduction of 8192 or more (with 4096, 1.08-1.25x:
//   its scale table and prologue are not paid back). Their main loop is slower (two tiles of 128
//   decode each weight twice; 1.2-1.5x dequantize + cuBLAS with many tiles), so they are taken
//   only there.
// QLORA_KERNELS_GEMM: "0" turns the kernel off (dequantize + cuBLAS, for comparisons); "always"
// runs it on problems of any size (tests, sanitizers); unset or anything else, by the rule above.
// QLORA_KERNELS_GEMM_TILE=128 or 256: that tile wherever the kernel runs (tests, comparisons).
int gemm_tile_tokens(int64_t M, int64_t N, int64_t reduction, bool transposed, int device, int64_t max_tokens) {
  const char* env = std::getenv("QLORA_KERNELS_GEMM");
  const std::string mode = env != nullptr ? env : "";
  if (mode == "0") return 0;
  const char* tile_env = std::getenv("QLORA_KERNELS_GEMM_TILE");
  const int forced = tile_env != nullptr ? std::atoi(tile_env) : 0;
  const int64_t sms = multiprocessor_count(device);
  const int64_t big = ceil_div(N, kGemmRows) * ceil_div(M, kGemmTokens);
  const int64_t small = ceil_div(N, kGemmRows) * ceil_div(M, kGemmTokensSmall);
  int tile = 0;
  // up to 128 tokens a 256-token tile is half empty, and it ran slower than the 128-token one at
  // least as many tiles (matmul_4bit at 128 tokens: 22016 x 8192 321 us, like dequantize + cuBLAS)
  const bool half_empty = M <= kGemmTokensSmall;
  if (mode == "always" || (M <= max_tokens && !half_empty && 2 * big >= sms))
    tile = kGemmTokens;
  else if (M <= max_tokens && (transposed ? 8 * small >= 7 * sms && reduction >= 8192 : 16 * small >= 7 * sms))
    tile = kGemmTokensSmall;
  if (tile != 0 && (forced == kGemmTokens || forced == kGemmTokensSmall)) tile = forced;
  return tile;
}

// Token tiles a group of the tile order walks (see the kernel): 4, or QLORA_KERNELS_GEMM_GROUP.
// On an H100 4 was 0-5% faster than 1 (row tiles first) on 13 of 14 layer x token counts.
int gemm_group(int64_t token_tiles) {
  const char* env = std::getenv("QLORA_KERNELS_GEMM_GROUP");
  const int64_t group = env != nullptr ? std::max(1, std::atoi(env)) : 4;
  return static_cast<int>(std::min(token_tiles, group));
}

// The scales of W [N_w, K_w] for the transposed kernel, in x's type (the decoded absmax, rounded as
// chunk_scale rounds it), as [K_w / 64 column groups][N_pad = N_w rounded up to 64], so that a step's
// scales are one tensor copy of 64 rows x 2 groups. Within each 64 rows, row 16 s + 8 h + 2 t + e
// sits at 16 t + 4 s + 2 h + e: lane t's 8 row pairs of a step are 32 contiguous bytes
// (decode_step_transposed). Rows past N_w get 0 (their weight bytes read as 0 past the tensor).
// One thread per (position, 16 column groups): consecutive threads write consecutive positions
// (coalesced), and each reads its row's absmax codes for 16 groups, which are adjacent bytes (L1
// serves all but the first). One thread per entry in group-major order read one byte per 32-byte
// sector and took tens of microseconds on the 65B layers.
constexpr int kScaleGroupsPerThread = 16;
template <typename T>
__global__ void scale_table_kernel(const void* __restrict__ absmax, const float* __restrict__ nested_absmax,
                                   const float* __restrict__ nested_code, const float* __restrict__ offset,
                                   T* __restrict__ out, int N_w, int N_pad, int K_w, int lg_bs, int lg_nbs,
                                   bool nested) {
  const int groups = K_w / kGemmStepK;
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  const int chunks = (groups + kScaleGroupsPerThread - 1) / kScaleGroupsPerThread;
  if (i >= int64_t{chunks} * N_pad) return;
  const int g0 = static_cast<int>(i / N_pad) * kScaleGroupsPerThread;
  const int p = static_cast<int>(i % N_pad);
  const int t = (p >> 4) & 3, s = (p >> 2) & 3, h = (p >> 1) & 1, e = p & 1;
  const int64_t n = (p & ~63) + 16 * s + 8 * h + 2 * t + e;
  const float off = nested ? __ldg(offset) : 0.0f;
  for (int g = g0; g < min(g0 + kScaleGroupsPerThread, groups); ++g) {
    float value = 0.0f;
    if (n < N_w) {
      const int64_t block = (n * K_w + int64_t{g} * kGemmStepK) >> lg_bs;
      value = nested ? fmaf(__ldg(nested_code + __ldg(static_cast<const uint8_t*>(absmax) + block)),
                            __ldg(nested_absmax + (block >> lg_nbs)), off)
                     : __ldg(static_cast<const float*>(absmax) + block);
    }
    out[int64_t{g} * N_pad + p] = from_float<T>(value);
  }
}

// The kernel for x's type T, the orientation, the token tile and whether it runs LoRA steps.
template <typename T, int kTokens>
const void* gemm_kernel_pointer(bool transposed, bool lora) {
  if (transposed) return reinterpret_cast<const void*>(gemm_4bit_kernel<T, true, kTokens, false>);
  return lora ? reinterpret_cast<const void*>(gemm_4bit_kernel<T, false, kTokens, true>)
              : reinterpret_cast<const void*>(gemm_4bit_kernel<T, false, kTokens, false>);
}
template <typename T>
const void* gemm_kernel_pointer(bool transposed, int tokens, bool lora) {
  return tokens == kGemmTokens ? gemm_kernel_pointer<T, kGemmTokens>(transposed, lora)
                               : gemm_kernel_pointer<T, kGemmTokensSmall>(transposed, lora);
}

// The token tile with which run_gemm_4bit takes the kernel (0: it does not) for x [M, K] @ W.T (or
// x [M, N] @ W, transposed), W [N, K]: forward: K % 64 == 0 (a step is one absmax block of a row);
// transposed: K % 64 == 0 (a tile's column groups are absmax blocks) and N % 8 == 0 (x's rows start
// on 16 bytes for the TMA); bf16 or fp16 x; sizes in 32 bits; by the rule of gemm_tile_tokens.
int gemm_kernel_tile(const at::Tensor& x, const at::Tensor& packed, int64_t blocksize, int64_t N, int64_t K,
                     bool transposed, bool lora = false) {
  const int64_t M = x.size(0);
  const int device = x.get_device();
  const bool sixteen_bit = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const bool shapes_ok = sixteen_bit && K > 0 && K % kGemmStepK == 0 &&
                         (!transposed || N % 8 == 0) && blocksize >= kGemmStepK && M > 0 && N > 0 &&
                         M < (int64_t{1} << 31) && N < (int64_t{1} << 31) && K < (int64_t{1} << 31) &&
                         ceil_div(N * K, blocksize) < (int64_t{1} << 31) && N * K < (int64_t{1} << 40) &&
                         x.is_contiguous() && is_aligned16(x.data_ptr()) && packed.is_contiguous() &&
                         is_aligned16(packed.data_ptr());
  if (!shapes_ok) return 0;
  const int tokens = gemm_tile_tokens(M, transposed ? K : N, transposed ? N : K, transposed, device,
                                     transposed ? kGemmDxMaxTokens : kGemmMaxTokens);
  if (tokens == 0) return 0;
  const void* kernel = x.scalar_type() == at::kBFloat16
                           ? gemm_kernel_pointer<__nv_bfloat16>(transposed, tokens, lora)
                           : gemm_kernel_pointer<__half>(transposed, tokens, lora);
  return gemm_kernel_usable(kernel, gemm_smem(tokens), device) ? tokens : 0;
}

// gemm_4bit_lora's LoRA term, scale * xa [M, r] @ B [N, r].T, taken by the kernel as extra steps
// (r % 8 == 0, xa contiguous on 16 bytes, B contiguous; gemm_4bit_lora checks).
struct LoraTerm {
  const at::Tensor& xa;
  const at::Tensor& B;
  double scale;
};

// gemm_4bit (transposed false): out [M, N] = x [M, K] @ W.T (+ bias) (+ accumulate) (+ lora's
// scale * xa @ B.T, as LoRA steps of the kernel: the caller checked that it takes them);
// gemm_4bit_dx (true): out [M, K] = x [M, N] @ W; W [N, K] in both. in_place (gemm_4bit_add_):
// accumulate is also the output, written in place (acc_name is its argument's name).
at::Tensor run_gemm_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                         c10::string_view quant_type, int64_t N, int64_t K_w, const std::optional<at::Tensor>& nested_absmax,
                         const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                         int64_t nested_blocksize, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& accumulate, bool transposed, bool in_place = false,
                         const char* acc_name = "accumulate", const LoraTerm* lora = nullptr) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [M, K], got sizes ", dims(x.sizes()));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
              "x: expected dtype bfloat16, float16 or float32, got ", x.scalar_type());
  const int64_t M = x.size(0);
  // W is [N, K] (K = K_w); x's width is the reduction: K (forward) or N (transposed)
  const int64_t K = transposed ? K_w : x.size(1);
  TORCH_CHECK(N >= 0 && K >= 0, "N, K: expected >= 0, got ", num(N), ", ", num(K));
  TORCH_CHECK(!transposed || x.size(1) == N, "x: expected sizes [M, ", num(N), "] (W is [", num(N), ", ", num(K),
              "]), got ", dims(x.sizes()));
  const int64_t out_width = transposed ? K : N, reduction = transposed ? N : K;
  check_operand(packed, "packed", x, "x");
  check_dtype(packed, "packed", at::kByte);
  check_numel(packed, "packed", (N * K + 1) / 2, "(N * K + 1) / 2 bytes");
  check_operand(absmax, "absmax", x, "x");
  const int lg_bs = log2_blocksize(blocksize, "blocksize");
  const QuantType qt = parse_quant_type(quant_type);
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK(nested_code.has_value() == nested && offset.has_value() == nested,
              "nested_absmax, nested_code, offset: expected all three (double quant) or none");
  // bias and accumulate may have any strides (the kernel reads contiguous copies)
  if (bias.has_value()) {
    check_same_device(*bias, "bias", x, "x");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias: expected dtype ", x.scalar_type(), " (x's), got ",
                bias->scalar_type());
    check_numel(*bias, "bias", N, "N");
  }
  if (accumulate.has_value()) {
    check_same_device(*accumulate, acc_name, x, "x");
    TORCH_CHECK(accumulate->scalar_type() == x.scalar_type(), acc_name, ": expected dtype ", x.scalar_type(),
                " (x's), got ", accumulate->scalar_type());
    TORCH_CHECK(accumulate->dim() == 2 && accumulate->size(0) == M && accumulate->size(1) == out_width,
                acc_name, ": expected sizes [", num(M), ", ", num(out_width), "], got ", dims(accumulate->sizes()));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t nblocks = ceil_div(N * K, blocksize);
  const int tile = gemm_kernel_tile(x, packed, blocksize, N, K_w, transposed, lora != nullptr);
  const bool fused = tile > 0;
  TORCH_INTERNAL_ASSERT(lora == nullptr || fused, "gemm_4bit: a LoRA term for the dequantize path");
  if (!fused) {
    // dequantize + cuBLAS (float32 x, K not a multiple of 64, blocksize 32, GPUs other than sm_90)
    const at::Tensor W =
        dequantize_4bit(packed, absmax, blocksize, quant_type, N * K, x.scalar_type(), nested_absmax, nested_code,
                        offset, nested_blocksize)
            .view({N, K});
    // the bias in cuBLAS' epilogue (beta = 1) where there is no accumulate to take that place
    // (gemm_4bit_dx has no bias)
    const at::Tensor Wx = transposed ? W : W.t();
    if (in_place) return accumulate->addmm_(x, Wx);
    if (!accumulate.has_value()) return bias.has_value() ? at::addmm(*bias, x, Wx) : at::mm(x, Wx);
    at::Tensor out = at::addmm(*accumulate, x, Wx);
    return bias.has_value() ? out.add_(bias->unsqueeze(0)) : out;
  }
  const int lg_nbs =
      check_absmax_dtype_and_nested(absmax, nested_absmax, nested_code, offset, nblocks, nested_blocksize, x, "x");
  check_numel(absmax, "absmax", nblocks, "ceil(N * K / blocksize)");
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor acc_c = accumulate.has_value() ? accumulate->contiguous() : at::Tensor();
  // in place: the kernel reads each output's accumulate before it writes that output, in the same
  // thread (a non-contiguous destination gets the result copied back)
  at::Tensor out = in_place ? acc_c : at::empty({M, out_width}, x.options());
  const bool vector_out = out_width % 8 == 0 && (!bias.has_value() || is_aligned16(bias_c.data_ptr())) &&
                          (!accumulate.has_value() || is_aligned16(acc_c.data_ptr()));
  PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  // x [M, reduction] in boxes of (tile) tokens x 64 elements, in the 128-byte swizzle
  const CUtensorMap x_map = tensor_map<2>(
      encode, CU_TENSOR_MAP_DATA_TYPE_UINT16, x.data_ptr(),
      {static_cast<cuuint64_t>(reduction), static_cast<cuuint64_t>(M)}, {static_cast<cuuint64_t>(reduction) * 2},
      {kGemmStepK, static_cast<cuuint32_t>(tile)}, CU_TENSOR_MAP_SWIZZLE_128B, "x", M, reduction);
  // W as bytes [N, K / 2]: boxes of 128 rows x 32 bytes (forward) or 64 rows x 64 bytes (transposed)
  const CUtensorMap w_map = tensor_map<2>(
      encode, CU_TENSOR_MAP_DATA_TYPE_UINT8, packed.data_ptr(),
      {static_cast<cuuint64_t>(K / 2), static_cast<cuuint64_t>(N)}, {static_cast<cuuint64_t>(K / 2)},
      {static_cast<cuuint32_t>(transposed ? kGemmRows / 2 : kGemmStepK / 2),
       static_cast<cuuint32_t>(transposed ? kGemmStepK : kGemmRows)},
      // transposed: the 64-byte swizzle, for conflict-free ldmatrix (decode_step_transposed)
      transposed ? CU_TENSOR_MAP_SWIZZLE_64B : CU_TENSOR_MAP_SWIZZLE_NONE,
      "a weight", N, K);
  // transposed: the scales [K / 64][N rounded up to 64] in x's type, boxes of 64 rows x 2 groups
  at::Tensor scales;
  CUtensorMap s_map = w_map;  // unused by the forward kernel
  if (transposed) {
    const int64_t N_pad = ceil_div(N, kGemmStepK) * kGemmStepK;
    scales = at::empty({K / kGemmStepK, N_pad}, x.options());
    s_map = tensor_map<2>(encode, CU_TENSOR_MAP_DATA_TYPE_UINT16, scales.data_ptr(),
                          {static_cast<cuuint64_t>(N_pad), static_cast<cuuint64_t>(K / kGemmStepK)},
                          {static_cast<cuuint64_t>(N_pad) * 2}, {kGemmStepK, 2}, CU_TENSOR_MAP_SWIZZLE_NONE,
                          "the scales", K / kGemmStepK, N_pad);
  }
  // gemm_4bit_lora: xa [M, r] in the boxes and swizzle of x (columns past r read as zeros)
  const CUtensorMap xa_map =
      lora == nullptr
          ? x_map
          : tensor_map<2>(encode, CU_TENSOR_MAP_DATA_TYPE_UINT16, lora->xa.data_ptr(),
                          {static_cast<cuuint64_t>(lora->xa.size(1)), static_cast<cuuint64_t>(M)},
                          {static_cast<cuuint64_t>(lora->xa.size(1)) * 2}, {kGemmStepK, static_cast<cuuint32_t>(tile)},
                          CU_TENSOR_MAP_SWIZZLE_128B, "xa", M, lora->xa.size(1));
  const int rank = lora == nullptr ? 0 : static_cast<int>(lora->xa.size(1));
  const int lora_steps = static_cast<int>(ceil_div(rank, kGemmStepK));
  const int64_t token_tiles = ceil_div(M, tile);
  const int64_t tiles = ceil_div(out_width, kGemmRows) * token_tiles;
  TORCH_CHECK(tiles < (int64_t{1} << 31), "x, N: too many tiles");
  const int group = gemm_group(token_tiles);
  const dim3 grid(static_cast<unsigned>(tiles));
  auto run = [&](auto tag) {
    using T = typename decltype(tag)::type;
    const float* na = nested ? nested_absmax->data_ptr<float>() : nullptr;
    const float* nc = nested ? nested_code->data_ptr<float>() : nullptr;
    const float* off = nested ? offset->data_ptr<float>() : nullptr;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    auto launch = [&](const void* kernel_pointer) {
      using Kernel = decltype(&gemm_4bit_kernel<T, false, kGemmTokens, false>);
      const auto kernel = reinterpret_cast<Kernel>(const_cast<void*>(kernel_pointer));
      kernel<<<grid, kGemmThreads, gemm_smem(tile), stream>>>(
          x_map, w_map, s_map, xa_map, lora == nullptr ? nullptr : reinterpret_cast<const T*>(lora->B.data_ptr()),
          rank, lora_steps, lora == nullptr ? 0.0f : static_cast<float>(lora->scale), absmax.data_ptr(), na, nc, off,
          bias.has_value() ? reinterpret_cast<const T*>(bias_c.data_ptr()) : nullptr,
          accumulate.has_value() ? reinterpret_cast<const T*>(acc_c.data_ptr()) : nullptr,
          reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(M), static_cast<int>(out_width),
          static_cast<int>(reduction), lg_bs, lg_nbs, static_cast<int>(qt), nested, vector_out, group);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (transposed) {
      const int64_t threads = ceil_div(scales.size(0), kScaleGroupsPerThread) * scales.size(1);
      scale_table_kernel<T><<<static_cast<unsigned>(ceil_div(threads, 256)), 256, 0, stream>>>(
          absmax.data_ptr(), na, nc, off, reinterpret_cast<T*>(scales.data_ptr()), static_cast<int>(N),
          static_cast<int>(scales.size(1)), static_cast<int>(K), lg_bs, lg_nbs, nested);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch(gemm_kernel_pointer<T>(transposed, tile, lora != nullptr));
  };
  if (x.scalar_type() == at::kBFloat16) {
    run(TypeTag<__nv_bfloat16>{});
  } else {
    run(TypeTag<__half>{});
  }
  if (in_place && !out.is_same(*accumulate)) accumulate->copy_(out);
  return out;
}

at::Tensor gemm_4bit(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                     c10::string_view quant_type, int64_t N, const std::optional<at::Tensor>& nested_absmax,
                     const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                     int64_t nested_blocksize, const std::optional<at::Tensor>& bias,
                     const std::optional<at::Tensor>& accumulate) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [M, K], got sizes ", dims(x.sizes()));
  return run_gemm_4bit(x, packed, absmax, blocksize, quant_type, N, x.size(1), nested_absmax, nested_code, offset,
                       nested_blocksize, bias, accumulate, /*transposed=*/false);
}

at::Tensor gemm_4bit_dx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                        c10::string_view quant_type, int64_t N, int64_t K,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                        const std::optional<at::Tensor>& offset, int64_t nested_blocksize) {
  return run_gemm_4bit(x, packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
                       nested_blocksize, std::nullopt, std::nullopt, /*transposed=*/true);
}

// x @ W.T + scale * xa @ B.T (+ bias): the LoRA layer's forward after its down-projection xa [M, r].
// Where the kernel runs, the LoRA term is ceil(r / 64) extra steps of its main loop (xa's columns as the
// x side, B's rows as the weight side) summed in float32 with the product: no [M, N] LoRA term is
// written and read back (at 4096 tokens x 8192 features, 64 MB each way). Elsewhere (dequantize
// + cuBLAS, r % 8 != 0, a strided xa or B, fp16 with a scale that s * B could not carry exactly)
// the LoRA term (and bias) is written first (scale applied in float32) and the base GEMM (the
// kernel or cuBLAS) adds onto it in place. QLORA_KERNELS_GEMM_LORA=0: that way everywhere.
at::Tensor gemm_4bit_lora(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                          c10::string_view quant_type, int64_t N, const std::optional<at::Tensor>& nested_absmax,
                          const std::optional<at::Tensor>& nested_code, const std::optional<at::Tensor>& offset,
                          int64_t nested_blocksize, const at::Tensor& xa, const at::Tensor& B, double scale,
                          const std::optional<at::Tensor>& bias) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [M, K], got sizes ", dims(x.sizes()));
  const int64_t M = x.size(0);
  check_same_device(xa, "xa", x, "x");
  TORCH_CHECK(xa.dim() == 2 && xa.size(0) == M, "xa: expected sizes [", num(M), ", r], got ", dims(xa.sizes()));
  TORCH_CHECK(xa.scalar_type() == x.scalar_type(), "xa: expected dtype ", x.scalar_type(), " (x's), got ",
              xa.scalar_type());
  const int64_t r = xa.size(1);
  check_same_device(B, "B", x, "x");
  TORCH_CHECK(B.dim() == 2 && B.size(0) == N && B.size(1) == r, "B: expected sizes [", num(N), ", ", num(r),
              "], got ", dims(B.sizes()));
  TORCH_CHECK(B.scalar_type() == x.scalar_type(), "B: expected dtype ", x.scalar_type(), " (x's), got ",
              B.scalar_type());
  TORCH_CHECK(std::isfinite(scale), "scale: expected a finite number, got ", fnum(scale));
  if (bias.has_value()) {
    check_same_device(*bias, "bias", x, "x");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias: expected dtype ", x.scalar_type(), " (x's), got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias: expected sizes [", num(N), "], got ",
                dims(bias->sizes()));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  // The kernel folds scale into B, rounded to x's type. In bf16 (float32's exponent range) that is
  // one rounding, none for a power of two. fp16's range is narrow: a small B times a scale below 1
  // would go subnormal (B ~ 1e-4 early in training, scale 1/64: 1.6e-6), so fp16 takes the kernel
  // only with a power-of-two scale in [1, 256] (exact short of |B| > 255).
  int exponent = 0;
  const bool scale_exact_pow2 = std::frexp(std::fabs(scale), &exponent) == 0.5 && exponent >= 1 && exponent <= 9;
  const bool scale_ok = x.scalar_type() == at::kBFloat16 || (x.scalar_type() == at::kHalf && scale_exact_pow2);
  const bool fusable = env_flag("QLORA_KERNELS_GEMM_LORA", true) && scale_ok && r > 0 && r % 8 == 0 && r < (int64_t{1} << 20) && xa.is_contiguous() &&
                       is_aligned16(xa.data_ptr()) && B.is_contiguous() &&
                       reinterpret_cast<uintptr_t>(B.data_ptr()) % 4 == 0 &&
                       gemm_kernel_tile(x, packed, blocksize, N, x.size(1), false, /*lora=*/true) > 0;
  if (fusable) {
    const LoraTerm lora{xa, B, scale};
    return run_gemm_4bit(x, packed, absmax, blocksize, quant_type, N, x.size(1), nested_absmax, nested_code, offset,
                         nested_blocksize, bias, std::nullopt, /*transposed=*/false, /*in_place=*/false, "accumulate",
                         &lora);
  }
  // the LoRA term (scale as cuBLAS' alpha, one rounding) and the bias first; beta = 0 ignores the
  // uninitialized output
  at::Tensor out = bias.has_value() ? at::addmm(*bias, xa, B.t(), 1, scale)
                                    : at::empty({M, N}, x.options()).addmm_(xa, B.t(), 0, scale);
  run_gemm_4bit(x, packed, absmax, blocksize, quant_type, N, x.size(1), nested_absmax, nested_code, offset,
                nested_blocksize, std::nullopt, out, /*transposed=*/false, /*in_place=*/true, "out");
  return out;
}

// out += x @ W.T (transposed false) or out += x @ W (true), in place: the LoRA layer's base GEMMs
// on its LoRA term. A functional accumulate costs a copy of it wherever cuBLAS runs instead
// (addmm's beta = 1 into a new tensor copies the input first), and one more output alive.
void gemm_4bit_add_(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                    int64_t blocksize, c10::string_view quant_type, int64_t N, int64_t K,
                    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& nested_code,
                    const std::optional<at::Tensor>& offset, int64_t nested_blocksize, bool transposed) {
  check_cuda(out, "out");
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor, got sizes ", dims(x.sizes()));
  TORCH_CHECK(transposed || x.size(1) == K, "x: expected sizes [M, ", num(K), "] (W is [", num(N), ", ", num(K),
              "]), got ", dims(x.sizes()));
  // the byte ranges the two span (conservative for interleaved views, like the Python check)
  auto span = [](const at::Tensor& t) {
    int64_t extent = 1;
    for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
    const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
    return std::make_pair(start, start + static_cast<uintptr_t>(extent * t.element_size()));
  };
  if (out.numel() > 0 && x.numel() > 0) {
    const auto [o0, o1] = span(out);
    const auto [x0, x1] = span(x);
    TORCH_CHECK(o1 <= x0 || x1 <= o0, "out: must not overlap x (it is written while x is read)");
  }
  run_gemm_4bit(x, packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset, nested_blocksize,
                std::nullopt, out, transposed, /*in_place=*/true, "out");
}

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("gemm_4bit", &qlora_kernels::gemm_4bit);
  m.impl("gemm_4bit_dx", &qlora_kernels::gemm_4bit_dx);
  m.impl("gemm_4bit_add_", &qlora_kernels::gemm_4bit_add_);
  m.impl("gemm_4bit_lora", &qlora_kernels::gemm_4bit_lora);
}
