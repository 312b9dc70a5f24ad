// Every op schema of qlora_kernels, in one place. The CUDA kernels register themselves in
// their own .cu files with TORCH_LIBRARY_IMPL(qlora_kernels, CUDA, m); the CPU kernels are
// the plain-torch reference, registered from Python (qlora_kernels/ops.py).
// qlora_kernels/_schemas.py repeats these strings for builds without this library; a test
// keeps the two identical.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(qlora_kernels, m) {
  m.def("quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)");
  m.def(
      "dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, int numel, "
      "ScalarType dtype, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "Tensor? offset=None, int nested_blocksize=256) -> Tensor");
  m.def("quantize_8bit(Tensor A, Tensor offset, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def(
      "dequantize_8bit(Tensor q, Tensor absmax, Tensor code, Tensor offset, int blocksize) -> Tensor");
  m.def(
      "matmul_4bit(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int N, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256, Tensor? bias=None) -> Tensor");
  m.def(
      "matmul_4bit_grouped(Tensor x, Tensor[] packed, Tensor[] absmax, int blocksize, str quant_type, "
      "int[] N, Tensor[]? nested_absmax, Tensor? nested_code, Tensor[]? offset, int nested_blocksize, "
      "Tensor?[] bias) -> Tensor[]");
  m.def(
      "gemm_4bit(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int N, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256, Tensor? bias=None, Tensor? accumulate=None) -> Tensor");
  m.def(
      "gemm_4bit_dx(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int N, int K, "
      "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256) -> Tensor");
  m.def(
      "gemm_4bit_add_(Tensor(a!) out, Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, "
      "int N, int K, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
      "int nested_blocksize=256, bool transposed=False) -> ()");
  m.def(
      "gemm_4bit_lora(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int N, "
      "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize, Tensor xa, Tensor B, "
      "float scale, Tensor? bias=None) -> Tensor");
  m.def("dropout_forward(Tensor x, int seed, float p, Tensor? device_seed=None) -> Tensor");
  m.def("dropout_backward_add(Tensor(a!) out, Tensor grad, int seed, float p, Tensor? device_seed=None) -> ()");
  m.def("dropout_linear(Tensor x, Tensor weight, int seed, float p, Tensor? device_seed=None) -> Tensor");
  m.def("matmul_dropout(Tensor a, Tensor b, int seed, float p, Tensor? device_seed=None) -> Tensor");
  m.def("dropout_grad_weight(Tensor g, Tensor x, int seed, float p, Tensor? device_seed=None) -> Tensor");
  m.def(
      "adamw_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, "
      "float bias_correction1, float bias_correction2) -> ()");
}

// Importing qlora_kernels._C only has to load this library (which runs the registrations
// above); the module itself is empty, so there is no pybind11 layer.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
