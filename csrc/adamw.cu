// adamw_step: one AdamW update of a param and its two float32 moments, in one pass over memory
// (reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq: 28 bytes an
// element with float32 params, 20 with bfloat16). The update is torch.optim.AdamW's
// single-tensor one (qlora_kernels/reference_optim.py), computed in float32; a 16-bit param
// is rounded once at the end. Not bit-exact with the reference (nvcc may contract a multiply
// and an add into an FMA, as torch's own CUDA AdamW does): the tests allow an ulp or two.
#include <torch/library.h>

#include "common.cuh"

namespace qlora_kernels {
namespace {

constexpr int kAdamWThreads = 256;

// The per-call scalars, folded on the host in double and rounded once to float32 (torch turns
// the Python scalars of its tensor ops into float32 the same way).
struct AdamWScalars {
  float decay;            // 1 - lr * weight_decay
  float lerp_weight;      // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  float neg_step_size;    // -lr / bias_correction1
  float bc2_sqrt;         // sqrt(bias_correction2)
};

__device__ __forceinline__ void adamw_update(float& p, float g, float& m, float& v,
                                             const AdamWScalars& s) {
  p = p * s.decay;
  // exp_avg.lerp_(grad, w) as torch computes it: from the nearer end, so w = 1 gives grad exactly
  m = s.lerp_weight < 0.5f ? m + s.lerp_weight * (g - m) : g - (g - m) * (1.0f - s.lerp_weight);
  v = v * s.beta2 + s.one_minus_beta2 * g * g;
  // IEEE sqrt and division (no fast math in this build): the quotient m / denom is the step
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  p = p + s.neg_step_size * (m / denom);
}

// N values of T in one aligned load/store: 16 bytes for a float4 or eight 16-bit values.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// VECTORIZED: every pointer is aligned to its Vec and each thread moves VEC elements per
// iteration with 16-byte loads of the param (VEC = 16 / sizeof(P)) and of the moments (one or
// two float4); the last n % VEC elements go one by one. Otherwise all elements go one by one.
template <typename P, typename G, bool VECTORIZED>
__global__ void __launch_bounds__(kAdamWThreads)
    adamw_kernel(P* __restrict__ param, const G* __restrict__ grad, float* __restrict__ exp_avg,
                 float* __restrict__ exp_avg_sq, int64_t n, AdamWScalars s) {
  constexpr int VEC = VECTORIZED ? 16 / sizeof(P) : 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kAdamWThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kAdamWThreads + threadIdx.x;
  const int64_t nvec = n / VEC;
  for (int64_t i = first; i < nvec; i += stride) {
    Vec<P, VEC> pv = reinterpret_cast<const Vec<P, VEC>*>(param)[i];
    const Vec<G, VEC> gv = reinterpret_cast<const Vec<G, VEC>*>(grad)[i];
    Vec<float, VEC> mv = reinterpret_cast<const Vec<float, VEC>*>(exp_avg)[i];
    Vec<float, VEC> vv = reinterpret_cast<const Vec<float, VEC>*>(exp_avg_sq)[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float p = to_float(pv.v[k]);
      adamw_update(p, to_float(gv.v[k]), mv.v[k], vv.v[k], s);
      pv.v[k] = from_float<P>(p);
    }
    reinterpret_cast<Vec<P, VEC>*>(param)[i] = pv;
    reinterpret_cast<Vec<float, VEC>*>(exp_avg)[i] = mv;
    reinterpret_cast<Vec<float, VEC>*>(exp_avg_sq)[i] = vv;
  }
  for (int64_t e = nvec * VEC + first; e < n; e += stride) {
    float p = to_float(param[e]);
    float m = exp_avg[e];
    float v = exp_avg_sq[e];
    adamw_update(p, to_float(grad[e]), m, v, s);
    param[e] = from_float<P>(p);
    exp_avg[e] = m;
    exp_avg_sq[e] = v;
  }
}

template <typename P, typename G, bool VECTORIZED>
void launch_adamw(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                  const at::Tensor& exp_avg_sq, const AdamWScalars& s) {
  constexpr int VEC = VECTORIZED ? 16 / sizeof(P) : 1;
  const int64_t n = param.numel();
  auto kernel = adamw_kernel<P, G, VECTORIZED>;
  const int grid = grid_size(kernel, kAdamWThreads, ceil_div(ceil_div(n, VEC), kAdamWThreads));
  kernel<<<grid, kAdamWThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<P*>(param.data_ptr()), reinterpret_cast<const G*>(grad.data_ptr()),
      exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), n, s);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline bool aligned_to(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

void check_range(double value, const char* name) {
  TORCH_CHECK(value > 0.0 && value <= 1.0, name, ": expected a value in (0, 1], got ",
              std::to_string(value));
}

void adamw_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                const at::Tensor& exp_avg_sq, double lr, double beta1, double beta2, double eps,
                double weight_decay, double bias_correction1, double bias_correction2) {
  check_cuda(param, "param");
  check_contiguous(param, "param");
  check_operand(grad, "grad", param, "param");
  check_operand(exp_avg, "exp_avg", param, "param");
  check_operand(exp_avg_sq, "exp_avg_sq", param, "param");
  check_dtype(exp_avg, "exp_avg", at::kFloat);
  check_dtype(exp_avg_sq, "exp_avg_sq", at::kFloat);
  const int64_t n = param.numel();
  check_numel(grad, "grad", n, "as param");
  check_numel(exp_avg, "exp_avg", n, "as param");
  check_numel(exp_avg_sq, "exp_avg_sq", n, "as param");
  check_range(bias_correction1, "bias_correction1");
  check_range(bias_correction2, "bias_correction2");
  const c10::cuda::CUDAGuard guard(param.device());

  const AdamWScalars s{static_cast<float>(1.0 - lr * weight_decay),
                       static_cast<float>(1.0 - beta1),
                       static_cast<float>(beta2),
                       static_cast<float>(1.0 - beta2),
                       static_cast<float>(eps),
                       static_cast<float>(-(lr / bias_correction1)),
                       static_cast<float>(std::sqrt(bias_correction2))};
  dispatch_float(param.scalar_type(), "param", [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    dispatch_float(grad.scalar_type(), "grad", [&](auto gtag) {
      using G = typename decltype(gtag)::type;
      if (n == 0) return;
      constexpr int64_t kVec = 16 / sizeof(P);
      // A view that starts off its Vec boundary (param[1:]) takes the element-wise kernel.
      const bool vec = aligned_to(param, 16) && aligned_to(grad, kVec * sizeof(G)) &&
                       aligned_to(exp_avg, kVec * 4) && aligned_to(exp_avg_sq, kVec * 4);
      if (vec)
        launch_adamw<P, G, true>(param, grad, exp_avg, exp_avg_sq, s);
      else
        launch_adamw<P, G, false>(param, grad, exp_avg, exp_avg_sq, s);
    });
  });
}

}  // namespace
}  // namespace qlora_kernels

TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m) { m.impl("adamw_step", &qlora_kernels::adamw_step); }
