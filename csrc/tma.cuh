// The sm_90 copy machinery the streaming kernels share (matmul_4bit.cu's bulk and rows kernels,
// gemm_4bit.cu): shared-memory addresses, mbarriers, bulk and tensor copies by the TMA, and the
// host side of tensor maps.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>

#include "common.cuh"

namespace qlora_kernels {

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Asks L2 for the line holding p (no register waits for it).
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_expect_bytes(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
}
// Waits until the phase of the given parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(shared_address(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
// bytes (a multiple of 16) from global src to shared dst (both 16-byte aligned), counted on bar;
// evict-first in L2: each weight byte is read once.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes, uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          shared_address(dst)),
      "l"(src), "r"(bytes), "r"(shared_address(bar)), "l"(policy)
      : "memory");
}

// The box at (column c0 bytes, row c1) of a 2-D tensor map to shared dst, counted on bar.
__device__ __forceinline__ void tensor_copy_2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* bar,
                                               uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
      "%3}], [%4], %5;" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(shared_address(bar)), "l"(policy)
      : "memory");
}
// The box at (c0, c1, c2) of a 3-D tensor map to shared dst, counted on bar.
__device__ __forceinline__ void tensor_copy_3d(void* dst, const CUtensorMap* map, int c0, int c1, int c2,
                                               uint64_t* bar, uint64_t policy) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
      "%3, %4}], [%5], %6;" ::"r"(shared_address(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(shared_address(bar)), "l"(policy)
      : "memory");
}

// Orders the consumers' shared-memory reads of a slot (generic proxy), which the producer has
// acquired through the slot's `empty` barrier, before the copy it issues next into that slot (async
// proxy). Without it the rows kernel read a few stale 16-byte pieces of x or weights now and then
// (28672 x 8192 at 24-32 tokens with K split 7 ways: 1-6 wrong outputs in most calls, H100); the
// mbarrier alone orders the reads for the generic proxy only.
__device__ __forceinline__ void fence_reads_before_async_copy() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
#endif

// cuTensorMapEncodeTiled, from the driver the runtime loaded (no link to libcuda). Null if the
// driver has none.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault,
                                                             &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      p = nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

// A tiled tensor map over rank-D global memory at base (dims and box innermost first, strides
// in bytes for dims 1..D-1), or an error naming what it maps.
template <int D>
CUtensorMap tensor_map(PFN_cuTensorMapEncodeTiled_v12000 encode, CUtensorMapDataType type, const void* base,
                       const cuuint64_t (&dims)[D], const cuuint64_t (&strides)[D - 1], const cuuint32_t (&box)[D],
                       CUtensorMapSwizzle swizzle, const char* what, int64_t rows, int64_t cols) {
  CUtensorMap map;
  cuuint32_t unit[D];
  for (int i = 0; i < D; ++i) unit[i] = 1;
  const CUresult res = encode(&map, type, D, const_cast<void*>(base), dims, strides, box, unit,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, "qlora_kernels: cuTensorMapEncodeTiled failed (", num(static_cast<int64_t>(res)),
              ") for ", what, " of ", num(rows), " x ", num(cols), " (an internal error)");
  return map;
}

// CTAs of an sm_90 kernel (`threads` threads, smem bytes of dynamic shared memory, whose limit it
// raises to that) that fit on one SM of the device, or 0 where it cannot run there: a GPU below
// 9.0, or a build whose code for the kernel is not sm_90. Checked once per kernel and device.
inline int sm90_ctas_per_sm(const void* kernel, int threads, int smem, int device) {
  static std::mutex mutex;
  static std::vector<std::tuple<const void*, int, int>> known;  // (kernel, device, CTAs per SM; 0: not usable)
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [k, d, n] : known)
    if (k == kernel && d == device) return n;
  int n = 0;
  if (compute_capability_major(device) >= 9) {
    cudaFuncAttributes attr;
    const bool ok = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess && attr.ptxVersion >= 90 &&
                    attr.binaryVersion >= 90 &&
                    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess &&
                    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem) == cudaSuccess;
    if (!ok) {
      n = 0;
      (void)cudaGetLastError();  // a build without sm_90 code: the caller takes another path
    }
  }
  known.emplace_back(kernel, device, n);
  return n;
}

}  // namespace qlora_kernels
