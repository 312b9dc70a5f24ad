// TMA read throughput by copy shape (sm_90): 1-D bulk copies (one per row piece) against 2-D
// tensor copies (one per box), a producer warp and 8 consumer warps that only wait and release,
// over a 22016 x 8192 4-bit weight's 90 MB. Why csrc/matmul_4bit.cu's rows kernel copies boxes.
//   nvcc -O3 -std=c++17 -arch=sm_90a -o tma_copy_rates benchmarks/tma_copy_rates.cu -lcuda
//   ./tma_copy_rates
// (H100 results: benchmarks/results/NVIDIA-H100-80GB-HBM3/experiments/matmul_4bit_tma_copy_rates.txt)
#include <cstdio>
#include <cstdint>
#include <cuda.h>
#include <cuda_runtime.h>

__device__ __forceinline__ uint32_t sa(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void bar_init(uint64_t* b, uint32_t c) { asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(sa(b)), "r"(c) : "memory"); }
__device__ __forceinline__ void expect(uint64_t* b, uint32_t n) { asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sa(b)), "r"(n) : "memory"); }
__device__ __forceinline__ void arrive(uint64_t* b) { asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(sa(b)) : "memory"); }
__device__ __forceinline__ void wait(uint64_t* b, uint32_t par) {
  uint32_t done = 0;
  do {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(sa(b)), "r"(par) : "memory");
  } while (!done);
}
__device__ __forceinline__ void bulk(void* dst, const void* src, uint32_t n, uint64_t* b) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(sa(dst)), "l"(src), "r"(n), "r"(sa(b)) : "memory");
}
__device__ __forceinline__ void tensor2d(void* dst, const CUtensorMap* map, int c0, int c1, uint64_t* b) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];" ::"r"(sa(dst)), "l"(map), "r"(c0), "r"(c1), "r"(sa(b)) : "memory");
}

// R rows x S bytes per stage, 2 stages; rows of RB bytes; N rows. mode 0: bulk per row, 1: one 2-D box (elem bytes E).
template <int R, int S, int MODE>
__global__ void __launch_bounds__(288) k(const uint8_t* w, int N, int RB, const __grid_constant__ CUtensorMap map, int E) {
  extern __shared__ __align__(128) uint8_t smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + 2 * R * S);
  uint64_t* empty = full + 2;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tiles = N / R, nst = RB / S;
  if (threadIdx.x == 0) { for (int i = 0; i < 2; ++i) { bar_init(&full[i], 1); bar_init(&empty[i], 256); } asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
  __syncthreads();
  if (warp == 8) {
    int c = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x)
      for (int s = 0; s < nst; ++s, ++c) {
        const int slot = c & 1;
        if (c >= 2) wait(&empty[slot], ((c >> 1) & 1) ^ 1);
        if (lane == 0) expect(&full[slot], R * S);
        __syncwarp();
        if (MODE == 0) {
          for (int r = lane; r < R; r += 32) bulk(smem + slot * R * S + r * S, w + (size_t)(tile * R + r) * RB + s * S, S, &full[slot]);
        } else if (lane == 0) {
          tensor2d(smem + slot * R * S, &map, s * S / E, tile * R, &full[slot]);
        }
      }
    return;
  }
  int c = 0;
  unsigned acc = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x)
    for (int s = 0; s < nst; ++s, ++c) {
      const int slot = c & 1;
      wait(&full[slot], (c >> 1) & 1);
      acc += smem[slot * R * S + threadIdx.x % (R * S)];
      arrive(&empty[slot]);
    }
  if (acc == 0xdeadbeef) printf("x");
}

template <int R, int S, int MODE>
void run(const uint8_t* w, int N, int RB, int extra_smem, int E) {
  CUtensorMap map{};
  if (MODE == 1) {
    cuuint64_t dims[2] = {(cuuint64_t)(RB / E), (cuuint64_t)N};
    cuuint64_t strides[1] = {(cuuint64_t)RB};
    cuuint32_t box[2] = {(cuuint32_t)(S / E), (cuuint32_t)R};
    cuuint32_t es[2] = {1, 1};
    CUresult r = cuTensorMapEncodeTiled(&map, E == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_UINT32, 2, (void*)w, dims, strides, box, es,
                                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) { printf("encode failed %d (R=%d S=%d E=%d)\n", r, R, S, E); return; }
  }
  const int smem = 2 * R * S + 64 + extra_smem;
  cudaFuncSetAttribute(k<R, S, MODE>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k<R, S, MODE>, 288, smem);
  const int grid = per_sm * 132;
  cudaEvent_t a, b;
  cudaEventCreate(&a); cudaEventCreate(&b);
  k<R, S, MODE><<<grid, 288, smem>>>(w, N, RB, map, E);
  cudaEventRecord(a);
  const int reps = 10;
  for (int i = 0; i < reps; ++i) k<R, S, MODE><<<grid, 288, smem>>>(w, N, RB, map, E);
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms; cudaEventElapsedTime(&ms, a, b);
  cudaError_t e = cudaGetLastError();
  printf("%-6s R=%3d S=%5d per_sm=%d  %7.1f us  %6.0f GB/s %s\n", MODE ? "tensor" : "bulk", R, S, per_sm, ms * 1e3 / reps,
         (double)N * RB * reps / (ms * 1e-3) / 1e9, e ? cudaGetErrorString(e) : "");
}

int main() {
  const int N = 22016, RB = 4096;  // 22016 x 8192 4-bit weight: 90 MB
  uint8_t* w;
  cudaMalloc(&w, (size_t)N * RB);
  cudaMemset(w, 1, (size_t)N * RB);
  for (int extra : {40000, 0}) {
    printf("-- extra smem %d (table etc.)\n", extra);
    run<16, 512, 0>(w, N, RB, extra, 1);
    run<16, 1024, 0>(w, N, RB, extra, 1);
    run<16, 2048, 0>(w, N, RB, extra, 1);
    run<16, 512, 1>(w, N, RB, extra, 4);
    run<16, 1024, 1>(w, N, RB, extra, 4);
    run<128, 64, 0>(w, N, RB, extra, 1);
    run<128, 128, 0>(w, N, RB, extra, 1);
    run<128, 64, 1>(w, N, RB, extra, 1);
    run<128, 128, 1>(w, N, RB, extra, 1);
    run<256, 64, 1>(w, N, RB, extra, 1);
    run<128, 256, 1>(w, N, RB, extra, 1);
  }
  return 0;
}
