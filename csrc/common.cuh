// Shared by the CUDA kernels of qlora_kernels: the 4-bit code tables as float32 bit patterns,
// the device helpers every kernel uses, and the host-side argument checks and launch sizing.
//
// Everything here must reproduce qlora_kernels/reference.py to the bit, so: no fast math,
// no flush-to-zero (1e-38f, the absmax floor, is subnormal), and explicit __fmul_rn /
// __fadd_rn wherever the reference rounds twice, so that nvcc cannot contract them into an FMA.
#pragma once

// No ATen/cuda/CUDAContext.h: it pulls in cuSPARSE / cuBLAS headers, which a toolkit without
// them (or torch's pip wheels) may not provide, and the kernels need none of it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <tuple>
#include <type_traits>
#include <cstdio>
#include <cstring>
#include <string>
#include <mutex>
#include <utility>
#include <vector>

namespace qlora_kernels {

enum QuantType : int { kNF4 = 0, kFP4 = 1 };

// The divisor floor of reference.ABSMAX_FLOOR: an all-zero block then scales to exact zeros
// instead of 0 * inf = NaN. 1e-38f is subnormal, which is why nothing here may flush to zero.
constexpr float kAbsmaxFloor = 1e-38f;

// ---------------------------------------------------------------------------------------------
// Code tables, as float32 bit patterns (bit-exact; generated from qlora_kernels/codes.py).
// `static` gives every translation unit its own copy, so the host shadows do not collide.

// The 16 values of each 4-bit code, index = code (codes.code_tensor). FP4 code 8 is +0.0,
// as codes.json stores it.
static __constant__ uint32_t kCodeValueBits[2][16] = {
    {0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, 0xbdba7871u,
     0x00000000u, 0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u, 0x3f1007abu,
     0x3f3913b3u, 0x3f800000u},
    {0x00000000u, 0x3baaaaabu, 0x3f2aaaabu, 0x3f800000u, 0x3eaaaaabu, 0x3f000000u, 0x3e2aaaabu,
     0x3e800000u, 0x00000000u, 0xbbaaaaabu, 0xbf2aaaabu, 0xbf800000u, 0xbeaaaaabu, 0xbf000000u,
     0xbe2aaaabu, 0xbe800000u},
};

// The 15 decision thresholds of each code: the float32 midpoints (lo + hi) * 0.5f between
// neighbouring values in ascending order (codes.thresholds). A scaled value x lands at
// position count(x > t); a NaN lands at position 15, as torch.bucketize puts it.
static __constant__ uint32_t kThresholdBits[2][15] = {
    {0xbf591cd8u, 0xbf1c5270u, 0xbeeb8480u, 0xbeadea76u, 0xbe703cecu, 0xbe0d38bcu, 0xbd3a7871u,
     0x3d22faffu, 0x3df64862u, 0x3e5067e0u, 0x3e9582d4u, 0x3ec753f9u, 0x3f006d04u, 0x3f248dafu,
     0x3f5c89dau},
    {0xbf555556u, 0xbf155556u, 0xbed55556u, 0xbe955556u, 0xbe555556u, 0xbdb00000u, 0xbb2aaaabu,
     0x00000000u, 0x3b2aaaabu, 0x3db00000u, 0x3e555556u, 0x3e955556u, 0x3ed55556u, 0x3f155556u,
     0x3f555556u},
};

// Position (ascending value) -> stored code (codes.sorted_order): identity for NF4; FP4 is
// sign-magnitude, ranked by value with +0 before -0 (a stable sort).
static __constant__ uint8_t kSortedOrder[2][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3},
};

// ---------------------------------------------------------------------------------------------
// Device helpers

// max that propagates NaN (fmaxf drops it): a block holding a NaN must get absmax NaN, as
// torch.amax gives. One FMNMX.NAN on sm_80+.
__device__ __forceinline__ float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a != a || b != b) ? __int_as_float(0x7fffffff) : fmaxf(a, b);
#endif
}

// 1 / max(absmax, 1e-38f) with IEEE rounding. The clamp is written so that a NaN absmax stays
// NaN (torch.clamp propagates NaN; fmaxf would turn it into the floor), which makes every
// scaled value of a NaN block NaN, as in the reference.
__device__ __forceinline__ float inverse_absmax(float absmax) {
  return __frcp_rn(absmax < kAbsmaxFloor ? kAbsmaxFloor : absmax);
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even conversions, as torch's .to(dtype) on CUDA.
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats -> one 32-bit word of two 16-bit values, the first in the low half (the lower
// address). One F2FP.PACK_AB per pair.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

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

// ---------------------------------------------------------------------------------------------
// Host helpers

// at::ScalarType -> the CUDA type the kernels compute with.
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with T the CUDA type of a float32 / float16 / bfloat16 tensor.
template <typename F>
inline void dispatch_float(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(TypeTag<float>{});
      break;
    case at::kHalf:
      f(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      break;
    default:
      TORCH_CHECK(false, name, ": expected dtype float32, float16 or bfloat16, got ", dtype);
  }
}

// Integers in error messages are formatted here, into plain strings, instead of being streamed
// by TORCH_CHECK: on the H100 machine (torch 2.11 built with gcc-toolset-13, this extension
// with Ubuntu's gcc 13) streaming an int64_t from this library's code segfaulted the process
// instead of raising, while messages of strings raised normally.
inline std::string num(int64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(v));
  return std::string(buf);
}

// Floats in messages, formatted the same way.
inline std::string fnum(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return std::string(buf);
}

inline std::string dims(at::IntArrayRef d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + num(d[i]);
  return s + "]";
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor, got sizes ", dims(t.sizes()),
              " with strides ", dims(t.strides()));
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected dtype ", dtype, ", got ",
              t.scalar_type());
}

// CUDA, contiguous, on the same device as `like` (named like_name).
inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& like,
                              const char* like_name) {
  check_cuda(t, name);
  TORCH_CHECK(t.device() == like.device(), name, ": expected a tensor on ", like.device(),
              " (the device of ", like_name, "), got one on ", t.device());
}

inline void check_operand(const at::Tensor& t, const char* name, const at::Tensor& like,
                          const char* like_name) {
  check_same_device(t, name, like, like_name);
  check_contiguous(t, name);
}

inline void check_numel(const at::Tensor& t, const char* name, int64_t expected,
                        const char* why) {
  TORCH_CHECK(t.numel() == expected, name, ": expected ", num(expected), " elements (", why,
              "), got ", num(t.numel()));
}

// A power of two in 32..4096; returns its log2 (the kernels index blocks with shifts).
inline int log2_blocksize(int64_t blocksize, const char* name) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0, name,
              ": expected a power of two in 32..4096, got ", num(blocksize));
  int lg = 0;
  while ((int64_t{1} << lg) < blocksize) ++lg;
  return lg;
}

inline QuantType parse_quant_type(c10::string_view quant_type) {
  if (quant_type == "nf4") return kNF4;
  if (quant_type == "fp4") return kFP4;
  TORCH_CHECK(false, "quant_type: expected \"nf4\" or \"fp4\", got \"", std::string(quant_type),
              "\"");
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// absmax's dtype (uint8 codes with double quant, else float32) and, with double quant, the
// nested absmax (ceil(nblocks / nested_blocksize) floats), the 8-bit code (256 floats) and the
// offset (one float), each on `like`'s device; returns log2(nested_blocksize) (0 without).
inline int check_absmax_dtype_and_nested(const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                                         const std::optional<at::Tensor>& nested_code,
                                         const std::optional<at::Tensor>& offset, int64_t nblocks,
                                         int64_t nested_blocksize, const at::Tensor& like, const char* like_name) {
  if (!nested_absmax.has_value()) {
    check_dtype(absmax, "absmax", at::kFloat);
    return 0;
  }
  check_dtype(absmax, "absmax", at::kByte);
  const int lg_nbs = log2_blocksize(nested_blocksize, "nested_blocksize");
  check_operand(*nested_absmax, "nested_absmax", like, like_name);
  check_dtype(*nested_absmax, "nested_absmax", at::kFloat);
  check_numel(*nested_absmax, "nested_absmax", ceil_div(nblocks, nested_blocksize),
              "ceil(absmax.numel() / nested_blocksize)");
  check_operand(*nested_code, "nested_code", like, like_name);
  check_dtype(*nested_code, "nested_code", at::kFloat);
  check_numel(*nested_code, "nested_code", 256, "the 8-bit code");
  check_operand(*offset, "offset", like, like_name);
  check_dtype(*offset, "offset", at::kFloat);
  check_numel(*offset, "offset", 1, "a scalar");
  return lg_nbs;
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A device attribute, asked once per (device, attribute): the query costs about as much host
// time as a decode-sized kernel runs.
inline int device_attribute(int device, cudaDeviceAttr attr) {
  static std::mutex mutex;
  static std::vector<std::tuple<int, cudaDeviceAttr, int>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [d, a, value] : cache)
    if (d == device && a == attr) return value;
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  cache.emplace_back(device, attr, value);
  return value;
}

// Grid of a grid-stride kernel: as many CTAs as fit on the device at once (more would only
// queue behind them and repeat the per-CTA table setup), and never more than there is work for.
template <typename Kernel>
inline int grid_size(Kernel kernel, int threads, int64_t ctas_of_work) {
  // The occupancy query and the SM count cost microseconds of host time, as much as a small
  // kernel runs: asked once per (kernel, block size, device), then cached.
  struct Entry {
    const void* kernel;
    int threads;
    int device;
    int64_t resident;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  const int device = c10::cuda::current_device();
  const void* key = reinterpret_cast<const void*>(kernel);
  int64_t resident = 0;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : cache)
      if (e.kernel == key && e.threads == threads && e.device == device) resident = e.resident;
    if (resident == 0) {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
      resident = static_cast<int64_t>(device_attribute(device, cudaDevAttrMultiProcessorCount)) * (per_sm > 0 ? per_sm : 1);
      cache.push_back({key, threads, device, resident});
    }
  }
  return static_cast<int>(ctas_of_work < resident ? ctas_of_work : resident);
}

// Programmatic dependent launch (PDL, sm_90 and up). A kernel launched with launch_pdl may start
// while the kernel before it on the stream is still finishing: its CTAs fill the SMs that
// kernel's last CTAs free, and do their setup there (barriers, lookup tables, L2 prefetches of
// their first absmax) instead of after the whole grid has drained and the next launch has gone
// through. (L2 prefetches of each CTA's first 32 KB of weights as well were slower on an H100:
// 4096 x 4096 at one token 7.9 us against 7.2 with neither; the prefetches queue in the TMA ahead
// of the copies that need the bytes.) The contract, which every kernel launched so keeps: before
// pdl_wait() it reads no global memory that a kernel before it may write (L2 prefetches are
// allowed: the L2 is where all SMs' writes meet, so a prefetched line is never stale) and writes
// no global memory at all. pdl_wait() returns once the kernels before it have finished and their
// writes are visible. Each kernel also lets the next one launch early (pdl_launch_dependents):
// the small ones from their start, the bulk and rows kernels once past their main loop.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The compute capability major of a device (device_attribute caches it).
inline int compute_capability_major(int device) {
  return device_attribute(device, cudaDevAttrComputeCapabilityMajor);
}

// The SM count of a device (device_attribute caches it).
inline int multiprocessor_count(int device) { return device_attribute(device, cudaDevAttrMultiProcessorCount); }

// An on/off environment variable: unset or empty gives `unset`, else whether it reads as a nonzero
// integer. Read at each call (a getenv: tens of nanoseconds against a launch's microseconds), so a
// test can flip it.
inline bool env_flag(const char* name, bool unset) {
  const char* env = std::getenv(name);
  return env == nullptr || *env == '\0' ? unset : std::atoi(env) != 0;
}

// Whether launches may overlap the kernel before them (PDL): with QLORA_KERNELS_PDL=1, on
// compute capability 9.0 and up. Off by default, as measured on an H100: it made back-to-back
// 4-bit matmuls faster (4096 x 4096 at one token 7.3 -> 6.5 us, at 64 tokens 16.0 -> 13.7) but
// the 7B decode, whose matmuls sit between other kernels, slower (fused and compiled, CUDA
// graphs: 277 tokens/s with it, 296 without).
inline bool pdl_enabled(int device) {
  return env_flag("QLORA_KERNELS_PDL", false) && compute_capability_major(device) >= 9;
}

// Whether this build's code of `kernel` for `device` is for compute capability `version` (90 for
// sm_90) or later, as PTX and as binary, asked once per (kernel, device): a build for older GPUs
// that runs JIT-compiled from PTX has only the kernel's fallback branch (an empty pdl_wait, or a
// __trap), so the host must not take the paths that need the newer code.
inline bool kernel_built_for(const void* kernel, int device, int version) {
  static std::mutex mutex;
  static std::vector<std::tuple<const void*, int, int>> known;  // kernel, device, lower of the two versions
  std::lock_guard<std::mutex> lock(mutex);
  for (const auto& [k, d, v] : known)
    if (k == kernel && d == device) return v >= version;
  cudaFuncAttributes attr;
  const bool found = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess;
  if (!found) (void)cudaGetLastError();  // this query's error only: not one pending from elsewhere
  const int v = found ? std::min(attr.ptxVersion, attr.binaryVersion) : 0;
  known.emplace_back(kernel, device, v);
  return v >= version;
}

// Whether a kernel, as it runs on this device, was compiled with its pdl_wait: from sm_90 code
// (a build for 8.x alone runs on an H100 from compute_80 PTX, where pdl_wait is empty, and must
// not overlap the kernel before). Asked once per (kernel, device).
inline bool kernel_has_pdl(const void* kernel, int device) { return kernel_built_for(kernel, device, 90); }

// kernel<<<grid, block, smem, current stream>>>(args...), with programmatic stream
// serialization where `overlap` (launch_pdl: where pdl_enabled), the device is sm_90 or later and
// the kernel has its pdl_wait: the kernel must keep the contract of pdl_wait above.
template <typename... Params, typename... Args>
inline void launch_pdl_if(bool overlap, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, int device,
                          Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = c10::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs =
      overlap && compute_capability_major(device) >= 9 && kernel_has_pdl(reinterpret_cast<const void*>(kernel), device)
          ? 1
          : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

template <typename... Params, typename... Args>
inline void launch_pdl(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, int device, Args&&... args) {
  launch_pdl_if(pdl_enabled(device), kernel, grid, block, smem, device, std::forward<Args>(args)...);
}

}  // namespace qlora_kernels
