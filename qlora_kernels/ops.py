"""Wires the three implementations to the dispatcher, once per process.

* The schemas come from the CUDA extension (``csrc/ops.cpp``) when it is loaded, otherwise
  from ``_schemas.py``.
* CPU tensors always run the plain-torch reference.
* CUDA tensors run the extension's kernels (registered in C++), or the Triton kernels, or
  the reference, as ``_backend.choose()`` decided.
* Every op has a fake (meta) kernel, so ``torch.compile(fullgraph=True)`` traces through.
"""

from __future__ import annotations

import torch

from . import _backend, reference, reference_optim
from ._schemas import SCHEMAS

# Each op's implementation is the function of its name in the first module that has one.
_REFERENCE_MODULES = (reference, reference_optim)


def _impl(modules, name):
    return getattr(next(m for m in modules if hasattr(m, name)), name)


BACKEND = _backend.choose()
_backend.warn_if_degraded(BACKEND)

_lib = torch.library.Library("qlora_kernels", "FRAGMENT")
for _name, _schema in SCHEMAS.items():
    # all of them without the extension; with it, any op newer than its build (an extension
    # compiled from older sources), which then runs its Triton or reference version below
    if BACKEND != "cuda" or not hasattr(torch.ops.qlora_kernels, _name):
        _lib.define(_schema)

for _name in SCHEMAS:
    _lib.impl(_name, _impl(_REFERENCE_MODULES, _name), "CPU")

if BACKEND == "triton":
    from .triton import dropout as _triton_dropout
    from .triton import adamw as _triton_adamw
    from .triton import matmul as _triton_matmul
    from .triton import quant as _triton_quant

    # each op is implemented by the first Triton module that defines a function of its name
    _triton_modules = (_triton_matmul, _triton_quant, _triton_dropout, _triton_adamw)
    for _name in SCHEMAS:
        _lib.impl(_name, _impl(_triton_modules, _name), "CUDA")
elif BACKEND == "torch":
    for _name in SCHEMAS:
        _lib.impl(_name, _impl(_REFERENCE_MODULES, _name), "CUDA")
else:
    # An op the compiled extension has no CUDA kernel for (one built from older sources, or an
    # op that only has Triton and torch versions) runs its Triton version, else the reference.
    for _name in SCHEMAS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"qlora_kernels::{_name}", "CUDA"):
            try:
                from .triton import adamw, dropout, matmul, quant

                _fallback = _impl((matmul, quant, dropout, adamw, *_REFERENCE_MODULES), _name)
            except ImportError:
                _fallback = _impl(_REFERENCE_MODULES, _name)
            _lib.impl(_name, _fallback, "CUDA")


def _nblocks(n, blocksize):
    return -(-n // blocksize)


@torch.library.register_fake("qlora_kernels::quantize_4bit")
def _(A, blocksize, quant_type):
    n = A.numel()
    packed = A.new_empty(((n + 1) // 2, 1), dtype=torch.uint8)
    return packed, A.new_empty((_nblocks(n, blocksize),), dtype=torch.float32)


@torch.library.register_fake("qlora_kernels::dequantize_4bit")
def _(packed, absmax, blocksize, quant_type, numel, dtype, nested_absmax=None, nested_code=None,
      offset=None, nested_blocksize=256):
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.register_fake("qlora_kernels::quantize_8bit")
def _(A, offset, code, blocksize):
    n = A.numel()
    q = A.new_empty((n,), dtype=torch.uint8)
    return q, A.new_empty((_nblocks(n, blocksize),), dtype=torch.float32)


@torch.library.register_fake("qlora_kernels::dequantize_8bit")
def _(q, absmax, code, offset, blocksize):
    return q.new_empty((q.numel(),), dtype=torch.float32)


@torch.library.register_fake("qlora_kernels::matmul_4bit")
def _(x, packed, absmax, blocksize, quant_type, N, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256, bias=None):
    return x.new_empty((x.shape[0], N))


@torch.library.register_fake("qlora_kernels::matmul_4bit_grouped")
def _(x, packed, absmax, blocksize, quant_type, N, nested_absmax, nested_code, offset, nested_blocksize, bias):
    return [x.new_empty((x.shape[0], n)) for n in N]


@torch.library.register_fake("qlora_kernels::gemm_4bit")
def _(x, packed, absmax, blocksize, quant_type, N, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256, bias=None, accumulate=None):
    return x.new_empty((x.shape[0], N))


@torch.library.register_fake("qlora_kernels::gemm_4bit_dx")
def _(x, packed, absmax, blocksize, quant_type, N, K, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256):
    return x.new_empty((x.shape[0], K))


@torch.library.register_fake("qlora_kernels::gemm_4bit_add_")
def _(out, x, packed, absmax, blocksize, quant_type, N, K, nested_absmax=None, nested_code=None, offset=None,
      nested_blocksize=256, transposed=False):
    return None


@torch.library.register_fake("qlora_kernels::gemm_4bit_lora")
def _(x, packed, absmax, blocksize, quant_type, N, nested_absmax, nested_code, offset, nested_blocksize, xa, B,
      scale, bias=None):
    return x.new_empty((x.shape[0], N))


@torch.library.register_fake("qlora_kernels::dropout_forward")
def _(x, seed, p, device_seed=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("qlora_kernels::dropout_backward_add")
def _(out, grad, seed, p, device_seed=None):
    return None


@torch.library.register_fake("qlora_kernels::dropout_linear")
def _(x, weight, seed, p, device_seed=None):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.register_fake("qlora_kernels::matmul_dropout")
def _(a, b, seed, p, device_seed=None):
    return a.new_empty((a.shape[0], b.shape[1]))


@torch.library.register_fake("qlora_kernels::dropout_grad_weight")
def _(g, x, seed, p, device_seed=None):
    return g.new_empty((g.shape[1], x.shape[1]))


@torch.library.register_fake("qlora_kernels::adamw_step")
def _(param, grad, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bias_correction1,
      bias_correction2):
    return None


quantize_4bit = torch.ops.qlora_kernels.quantize_4bit.default
dequantize_4bit = torch.ops.qlora_kernels.dequantize_4bit.default
quantize_8bit = torch.ops.qlora_kernels.quantize_8bit.default
dequantize_8bit = torch.ops.qlora_kernels.dequantize_8bit.default
matmul_4bit = torch.ops.qlora_kernels.matmul_4bit.default
matmul_4bit_grouped = torch.ops.qlora_kernels.matmul_4bit_grouped.default
gemm_4bit = torch.ops.qlora_kernels.gemm_4bit.default
gemm_4bit_dx = torch.ops.qlora_kernels.gemm_4bit_dx.default
gemm_4bit_add_ = torch.ops.qlora_kernels.gemm_4bit_add_.default
gemm_4bit_lora = torch.ops.qlora_kernels.gemm_4bit_lora.default
dropout_forward = torch.ops.qlora_kernels.dropout_forward.default
dropout_backward_add = torch.ops.qlora_kernels.dropout_backward_add.default
dropout_linear = torch.ops.qlora_kernels.dropout_linear.default
matmul_dropout = torch.ops.qlora_kernels.matmul_dropout.default
dropout_grad_weight = torch.ops.qlora_kernels.dropout_grad_weight.default
adamw_step = torch.ops.qlora_kernels.adamw_step.default
