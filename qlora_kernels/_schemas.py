"""The op schemas, for the builds without the CUDA extension.

``csrc/ops.cpp`` is where the schemas are defined when the extension is built; this list is
the same text, used to define the ops from Python when it is not. ``tests/test_build.py``
checks that the two agree word for word.
"""

SCHEMAS = {
    "quantize_4bit": "quantize_4bit(Tensor A, int blocksize, str quant_type) -> (Tensor, Tensor)",
    "dequantize_4bit": (
        "dequantize_4bit(Tensor packed, Tensor absmax, int blocksize, str quant_type, int numel, "
        "ScalarType dtype, Tensor? nested_absmax=None, Tensor? nested_code=None, "
        "Tensor? offset=None, int nested_blocksize=256) -> Tensor"
    ),
    "quantize_8bit": "quantize_8bit(Tensor A, Tensor offset, Tensor code, int blocksize) -> (Tensor, Tensor)",
    "dequantize_8bit": (
        "dequantize_8bit(Tensor q, Tensor absmax, Tensor code, Tensor offset, int blocksize) -> Tensor"
    ),
    "matmul_4bit": (
        "matmul_4bit(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int N, "
        "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
        "int nested_blocksize=256, Tensor? bias=None) -> Tensor"
    ),
    "matmul_4bit_grouped": (
        "matmul_4bit_grouped(Tensor x, Tensor[] packed, Tensor[] absmax, int blocksize, str quant_type, "
        "int[] N, Tensor[]? nested_absmax, Tensor? nested_code, Tensor[]? offset, int nested_blocksize, "
        "Tensor?[] bias) -> Tensor[]"
    ),
    "gemm_4bit": (
        "gemm_4bit(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int N, "
        "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
        "int nested_blocksize=256, Tensor? bias=None, Tensor? accumulate=None) -> Tensor"
    ),
    "gemm_4bit_dx": (
        "gemm_4bit_dx(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int N, int K, "
        "Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
        "int nested_blocksize=256) -> Tensor"
    ),
    "gemm_4bit_add_": (
        "gemm_4bit_add_(Tensor(a!) out, Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, "
        "int N, int K, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None, "
        "int nested_blocksize=256, bool transposed=False) -> ()"
    ),
    "gemm_4bit_lora": (
        "gemm_4bit_lora(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int N, "
        "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize, Tensor xa, Tensor B, "
        "float scale, Tensor? bias=None) -> Tensor"
    ),
    "dropout_forward": "dropout_forward(Tensor x, int seed, float p, Tensor? device_seed=None) -> Tensor",
    "dropout_backward_add": "dropout_backward_add(Tensor(a!) out, Tensor grad, int seed, float p, Tensor? device_seed=None) -> ()",
    "dropout_linear": "dropout_linear(Tensor x, Tensor weight, int seed, float p, Tensor? device_seed=None) -> Tensor",
    "matmul_dropout": "matmul_dropout(Tensor a, Tensor b, int seed, float p, Tensor? device_seed=None) -> Tensor",
    "dropout_grad_weight": (
        "dropout_grad_weight(Tensor g, Tensor x, int seed, float p, Tensor? device_seed=None) -> Tensor"
    ),
    "adamw_step": (
        "adamw_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, "
        "float bias_correction1, float bias_correction2) -> ()"
    ),
}
