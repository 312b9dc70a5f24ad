// Dropout whose mask is never stored: it is regenerated from a seed in forward and backward
// (LoRA's dropout on x in qlora_kernels.matmul_4bit_lora).
//
// Element i keeps its value when Philox4x32-10 output (i % 4) of the counter (g_lo, g_hi, 0, 0),
// g = i / 4, under the key (seed_lo, seed_hi), is >= floor(p * 2^32) (an integer compare: no
// float conversion, P(drop) = p to 2^-32); kept values are multiplied by 1 / (1 - p) in float32,
// dropped ones are +0. The same function as qlora_kernels/reference.py (dropout_forward,
// dropout_backward_add) and the Triton kernels (tl.randint4x has this counter layout), so all
// three backends draw the same mask, tested bit for bit. The mask of an element depends only
// on its flat index, not on how a thread reaches it: the vector and the scalar paths agree.
// The seed is an int argument, or (device_seed) an int64 tensor the kernel reads, which is what
// a captured CUDA graph needs to draw a new mask at every replay.
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

#include "common.cuh"

namespace qlora_kernels {
namespace {

constexpr int kDropoutThreads = 256;

// The four uint32 randoms of Philox group g (elements 4g .. 4g + 3).
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

// One 16-byte vector of T: 8 bf16/fp16 values (two Philox groups) or 4 fp32 values (one).
template <typename T>
struct Vec {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  static constexpr int kGroups = kElems / 4;
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
    uint4 r[V::kGroups];
#pragma unroll
    for (int j = 0; j < V::kGroups; ++j) r[j] = philox_group(seed, static_cast<uint64_t>(e0 / 4 + j));
    if (vec && c < nfull) {
      const uint4 a = __ldcs(reinterpret_cast<const uint4*>(in + e0));  // read once: evict-first
      uint4 o = make_uint4(0u, 0u, 0u, 0u);
      if constexpr (kMode == 1) o = *reinterpret_cast<const uint4*>(out + e0);
      const T* av = reinterpret_cast<const T*>(&a);
      T* ov = reinterpret_cast<T*>(&o);
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        const bool keep = component(r[i / 4], i % 4) >= threshold;
        const float d = keep ? __fmul_rn(to_float(av[i]), scale) : 0.0f;
        ov[i] = from_float<T>(kMode == 1 ? __fadd_rn(to_float(ov[i]), d) : d);
      }
      *reinterpret_cast<uint4*>(out + e0) = o;
    } else {
      const int64_t end = e0 + kElems < n ? e0 + kElems : n;
      for (int64_t e = e0; e < end; ++e) {
        const int i = static_cast<int>(e - e0);
        const bool keep = component(r[i / 4], i % 4) >= threshold;
        const float d = keep ? __fmul_rn(to_float(in[e]), scale) : 0.0f;
        out[e] = from_float<T>(kMode == 1 ? __fadd_rn(to_float(out[e]), d) : d);
      }
    }
  }
}

// Floats in messages formatted here, like integers (see num() in common.cuh).
std::string fnum(double v) {
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return std::string(buf);
}

void check_p(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p: expected a dropout probability in [0, 1), got ", fnum(p));
}

// floor(p * 2^32) (exact: scaling by a power of two), and 1 / (1 - p) rounded to float32:
// reference.dropout_threshold / dropout_scale.
uint32_t threshold_of(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xffffffffu : static_cast<uint32_t>(t);
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

at::Tensor dropout_forward(const at::Tensor& x, int64_t seed, double p,
                           const std::optional<at::Tensor>& device_seed) {
  check_cuda(x, "x");
  check_contiguous(x, "x");
  check_p(p);
  const int64_t* seed_ptr = device_seed_ptr(device_seed, x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  launch<0>(x, "x", out, seed, seed_ptr, p);
  return out;
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

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) {
  m.impl("dropout_forward", &qlora_kernels::dropout_forward);
  m.impl("dropout_backward_add", &qlora_kernels::dropout_backward_add);
}
