// Blockwise 8-bit quantization onto a 256-entry ascending code (bitsandbytes' dynamic map) and
// its dequantization. Used for double quantization: the input is the absmax vector of a 4-bit
// tensor (one float per 64 weights), so these kernels are small and favour simplicity.
// Bit-exact with qlora_kernels/reference.py.
#include <torch/library.h>

#include "common.cuh"

namespace qlora_kernels {
namespace {

constexpr int kCodeSize = 256;

// =============================================================================================
// quantize_8bit: one warp per quant block, two passes over it: the absmax (a warp shuffle
// reduction, no barrier), then the codes (the second pass reads from L1/L2). A whole CTA per
// block left each SM with 8 blocks in flight, each waiting on barriers and an 8-step
// dependent search: the 3.7M-entry absmax of a 28672x8192 weight took ~45 us on an H100.
// Warps stride over the blocks; the CTA builds the midpoint table once.

constexpr int kQuant8Threads = 256;
constexpr int kQuant8Warps = kQuant8Threads / 32;

template <typename T>
__global__ void __launch_bounds__(kQuant8Threads)
    quantize_8bit_kernel(const T* __restrict__ A, const float* __restrict__ offset,
                         const float* __restrict__ code, uint8_t* __restrict__ q,
                         float* __restrict__ absmax, int64_t n, int lg_bs) {
  // The 255 decision thresholds, (code[i] + code[i + 1]) * 0.5f in float32 (codes.midpoints).
  __shared__ float s_mid[kCodeSize];
  for (int i = threadIdx.x; i < kCodeSize - 1; i += kQuant8Threads)
    s_mid[i] = __fmul_rn(__fadd_rn(code[i], code[i + 1]), 0.5f);
  __syncthreads();

  const int lane = threadIdx.x & 31;
  // The offset is a device tensor: read here, so the host never syncs on it.
  const float off = __ldg(offset);
  const int64_t nblocks = ((n - 1) >> lg_bs) + 1;
  for (int64_t blk = static_cast<int64_t>(blockIdx.x) * kQuant8Warps + (threadIdx.x >> 5);
       blk < nblocks; blk += static_cast<int64_t>(gridDim.x) * kQuant8Warps) {
    const int64_t start = blk << lg_bs;
    const int64_t end = start + (int64_t{1} << lg_bs) < n ? start + (int64_t{1} << lg_bs) : n;

    // Elements past n are the reference's zero padding: |0| never raises the max, so they
    // are simply left out.
    float am = 0.0f;
    for (int64_t e = start + lane; e < end; e += 32)
      am = nan_max(am, fabsf(__fsub_rn(to_float(A[e]), off)));
    for (int o = 16; o > 0; o >>= 1) am = nan_max(am, __shfl_xor_sync(0xffffffffu, am, o));
    if (lane == 0) absmax[blk] = am;

    const float inv = inverse_absmax(am);
    for (int64_t e = start + lane; e < end; e += 32) {
      const float s = __fmul_rn(__fsub_rn(to_float(A[e]), off), inv);
      // Branchless lower bound: the number of midpoints m with !(m >= s), i.e. m < s, so a
      // value exactly on a midpoint takes the lower code and NaN lands at 255
      // (torch.bucketize).
      int p = 0;
#pragma unroll
      for (int step = kCodeSize / 2; step > 0; step >>= 1) p += (s_mid[p + step - 1] >= s) ? 0 : step;
      q[e] = static_cast<uint8_t>(p);
    }
  }
}

template <typename T>
void launch_quantize_8bit(const at::Tensor& A, const at::Tensor& offset, const at::Tensor& code,
                          at::Tensor& q, at::Tensor& absmax, int lg_bs) {
  const int grid = grid_size(quantize_8bit_kernel<T>, kQuant8Threads, ceil_div(absmax.numel(), kQuant8Warps));
  quantize_8bit_kernel<T><<<grid, kQuant8Threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(A.data_ptr()), offset.data_ptr<float>(), code.data_ptr<float>(),
      q.data_ptr<uint8_t>(), absmax.data_ptr<float>(), A.numel(), lg_bs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_8bit(const at::Tensor& A, const at::Tensor& offset,
                                                 const at::Tensor& code, int64_t blocksize) {
  check_cuda(A, "A");
  check_contiguous(A, "A");
  check_operand(offset, "offset", A, "A");
  check_dtype(offset, "offset", at::kFloat);
  check_numel(offset, "offset", 1, "a scalar");
  check_operand(code, "code", A, "A");
  check_dtype(code, "code", at::kFloat);
  check_numel(code, "code", kCodeSize, "the 8-bit code");
  const int lg_bs = log2_blocksize(blocksize, "blocksize");
  const c10::cuda::CUDAGuard guard(A.device());

  const int64_t n = A.numel();
  const int64_t nblocks = ceil_div(n, blocksize);
  TORCH_CHECK(nblocks <= int64_t{0x7fffffff}, "A: expected at most 2^31 - 1 blocks of ", num(blocksize),
              " elements, got ", num(nblocks));
  at::Tensor q = at::empty({n}, A.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({nblocks}, A.options().dtype(at::kFloat));
  dispatch_float(A.scalar_type(), "A", [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (n > 0) launch_quantize_8bit<T>(A, offset, code, q, absmax, lg_bs);
  });
  return {q, absmax};
}

// =============================================================================================
// dequantize_8bit: one element per thread, grid-stride; the code in shared memory.

constexpr int kDequant8Threads = 256;

__global__ void __launch_bounds__(kDequant8Threads)
    dequantize_8bit_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                           const float* __restrict__ code, const float* __restrict__ offset,
                           float* __restrict__ out, int64_t n, int lg_bs) {
  __shared__ float s_code[kCodeSize];
  for (int i = threadIdx.x; i < kCodeSize; i += kDequant8Threads) s_code[i] = code[i];
  __syncthreads();
  const float off = __ldg(offset);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kDequant8Threads + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kDequant8Threads) {
    // code[q] * absmax + offset: a multiply, then an add (two roundings, never an FMA).
    out[e] = __fadd_rn(__fmul_rn(s_code[q[e]], __ldg(absmax + (e >> lg_bs))), off);
  }
}

at::Tensor dequantize_8bit(const at::Tensor& q, const at::Tensor& absmax, const at::Tensor& code,
                           const at::Tensor& offset, int64_t blocksize) {
  check_cuda(q, "q");
  check_dtype(q, "q", at::kByte);
  check_contiguous(q, "q");
  check_operand(absmax, "absmax", q, "q");
  check_dtype(absmax, "absmax", at::kFloat);
  check_operand(code, "code", q, "q");
  check_dtype(code, "code", at::kFloat);
  check_numel(code, "code", kCodeSize, "the 8-bit code");
  check_operand(offset, "offset", q, "q");
  check_dtype(offset, "offset", at::kFloat);
  check_numel(offset, "offset", 1, "a scalar");
  const int lg_bs = log2_blocksize(blocksize, "blocksize");
  const int64_t n = q.numel();
  check_numel(absmax, "absmax", ceil_div(n, blocksize), "ceil(q.numel() / blocksize)");
  const c10::cuda::CUDAGuard guard(q.device());

  at::Tensor out = at::empty({n}, q.options().dtype(at::kFloat));
  if (n == 0) return out;
  const int grid = grid_size(dequantize_8bit_kernel, kDequant8Threads, ceil_div(n, kDequant8Threads));
  dequantize_8bit_kernel<<<grid, kDequant8Threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      q.data_ptr<uint8_t>(), absmax.data_ptr<float>(), code.data_ptr<float>(),
      offset.data_ptr<float>(), out.data_ptr<float>(), n, lg_bs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("quantize_8bit", &qlora_kernels::quantize_8bit);
  m.impl("dequantize_8bit", &qlora_kernels::dequantize_8bit);
}
