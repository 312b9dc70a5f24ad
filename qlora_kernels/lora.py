"""``matmul_4bit_lora``: the QLoRA layer for training, one autograd op.

    Y = x @ W.T + scale * dropout(x) @ A.T @ B.T (+ bias)

W ``[N, K]`` frozen in 4 bits (no gradient), A ``[r, K]`` and B ``[N, r]`` trainable.

Two torch.library ops, each an opaque composite of our kernels and cuBLAS, tied together with
``torch.library.register_autograd`` (so ``torch.compile(fullgraph=True)`` traces a training step
through them, using the fake kernels below for shapes). In eager mode the same two functions
run under a plain ``torch.autograd.Function`` (``_EagerLoRA``), which costs less Python per call:

* ``qlora_kernels::matmul_4bit_lora`` (forward) -> ``(Y, xa)`` with ``xa = dropout(x) @ A.T``
  ``[M, r]`` (with dropout one fused op, ``ops.dropout_linear``: the CUDA kernel reads x once,
  masking it as it multiplies, instead of a dropout pass writing the dropped-out x for a GEMM
  to read back). The rest is the op ``gemm_4bit_lora``: on an H100 (compute capability 9.0) a
  wgmma GEMM that reads W in 4 bits and decodes it in registers (``csrc/gemm_4bit.cu``), which
  saves the dequantize pass (8192 x 22016 at 4096 tokens: ~155 us of ~2.1 ms); elsewhere our
  ``dequantize_4bit`` into a bf16/fp16 buffer (freed right after its GEMM, so the caching
  allocator hands the block to the next layer's dequantize), then cuBLAS. The LoRA
  up-projection is not a separate pass over Y: ``gemm_4bit_lora`` takes xa and B, and the
  wgmma kernel runs ``scale * xa @ B.T`` as ceil(r / 64) extra steps of its main loop, so Y is
  written once and never read back. Elsewhere (cuBLAS, r % 8 != 0, fp16 with a scale that is
  not a power of two in [1, 256]) the LoRA term (and bias) is written first and the base GEMM
  adds onto it in place.
* ``qlora_kernels::matmul_4bit_lora_backward`` -> ``(dX, dA, dB)``: ``g = scale * dY @ B``
  ``[M, r]`` is computed once and shared by ``dA = g.T @ dropout(x)`` (with dropout one fused
  op, ``ops.dropout_grad_weight``: x read once, masked on its way into the sum) and
  ``dX = dY @ W + dropout_backward(g @ A)`` (the LoRA term first, ``ops.matmul_dropout``:
  written once, masked as it is stored; then the base GEMM adds onto it in place,
  ``gemm_4bit_add_(..., transposed=True)``: up to 1024 tokens on an H100 the same wgmma kernel
  with W as the reduction side, else dequantize + cuBLAS with beta = 1); ``dB = scale * dY.T @ xa``.
  Gradients not needed are not computed (dX when x needs none: no dequantize at all).

Saved for backward: x, the small ``xa`` and the dropout seed (a CPU int64 scalar); never a
dequantized weight, never a dense mask: the mask is regenerated from the seed by the dropout
ops (the same function of (seed, element index) in CUDA, Triton and the reference).

The seed is drawn per call from torch's default CPU generator (or ``generator``), so
``torch.manual_seed`` makes runs reproducible, and ``torch.utils.checkpoint`` (which restores
the CPU RNG state before recomputing) regenerates the same mask. It enters the ops as a tensor,
so that under ``torch.compile`` it is a traced random draw, not a constant baked into the graph.
A caller may pass its own seed instead (``seed=``): an int64 scalar on the CPU, or on x's device,
where the kernels read it at run time. The latter is how a captured CUDA graph of a training
step (``qlora_kernels.train.graphs``) draws new masks at each replay: it writes fresh seeds into
a device tensor before replaying, and forward, recomputation and backward all read them there.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from .functional import FLOAT_DTYPES, _check_tensor
from .matmul import _nested_args, check_x_and_weight
from .quant_state import QuantState

#: dtypes x may have: the 16-bit training dtypes, float32, and float64 on CPU (gradcheck).
X_DTYPES = FLOAT_DTYPES + (torch.float64,)

_SEED_HIGH = 2**63 - 1


def draw_seed(generator: torch.Generator | None = None, count: int | None = None) -> Tensor:
    """A dropout seed: a CPU int64 scalar tensor drawn from ``generator`` (default: torch's
    default CPU generator); or, with ``count``, that many seeds in a vector."""
    shape = () if count is None else (count,)
    return torch.randint(0, _SEED_HIGH, shape, generator=generator, dtype=torch.int64)


def _dequantize(packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
                nested_blocksize, dtype) -> Tensor:
    """W ``[N, K]`` in ``dtype`` (float64 via an exact float32 decode)."""
    out_dtype = dtype if dtype in FLOAT_DTYPES else torch.float32
    W = ops.dequantize_4bit(packed, absmax, blocksize, quant_type, N * K, out_dtype,
                            nested_absmax, nested_code, offset, nested_blocksize)
    return _as(W.view(N, K), dtype)


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; the dtype test first, because even a no-op ``Tensor.to`` costs a few
    microseconds of dispatch, and a 7B training step makes ~1800 of them (it is CPU-bound)."""
    return t if t.dtype == dtype else t.to(dtype)


def _seed_args(seed: Tensor) -> tuple[int, Optional[Tensor]]:
    """``seed`` as the dropout ops take it, (seed, device_seed): a CPU scalar is passed by value;
    a seed on the device is read by the kernel (under a CUDA graph, each replay then uses the
    value the tensor holds)."""
    return (int(seed), None) if seed.device.type == "cpu" else (0, seed)


def _down(x2: Tensor, A: Tensor, seed: Optional[Tensor], p: float) -> Tensor:
    """``dropout(x2) @ A.T`` ``[M, r]``: with dropout, one fused op (the CUDA kernel reads x once
    instead of a dropout pass that writes the dropped-out x and a GEMM that reads it back)."""
    if p == 0.0:
        return x2 @ A.T
    seed_value, device_seed = _seed_args(seed)
    return ops.dropout_linear(x2.contiguous(), A.contiguous(), seed_value, p, device_seed)


def _up(g: Tensor, A: Tensor, seed: Optional[Tensor], p: float) -> Tensor:
    """``dropout_backward(g @ A)`` ``[M, K]``, dX's LoRA term: with dropout, one fused op (the
    CUDA kernel writes it once, masked as it is stored)."""
    if p == 0.0:
        return torch.mm(g, A)
    seed_value, device_seed = _seed_args(seed)
    return ops.matmul_dropout(g, A.contiguous(), seed_value, p, device_seed)


def _grad_down(g: Tensor, x2: Tensor, seed: Optional[Tensor], p: float) -> Tensor:
    """``g.T @ dropout(x2)`` ``[r, K]``, dA: with dropout, one fused op (the CUDA kernel reads x
    once and masks it on the way into the sum over the tokens)."""
    if p == 0.0:
        return torch.mm(g.T, x2)
    seed_value, device_seed = _seed_args(seed)
    return ops.dropout_grad_weight(g, x2.contiguous(), seed_value, p, device_seed)


def _forward_impl(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str, N: int,
                  nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], offset: Optional[Tensor],
                  nested_blocksize: int, A: Tensor, B: Tensor, scale: float, p: float,
                  seed: Optional[Tensor], bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(Y, xa): the forward, shared by the custom op and the eager autograd.Function."""
    K = x.shape[-1]
    lead = x.shape[:-1]
    dt = x.dtype
    x2 = x.reshape(-1, K)
    # The dropped-out x lives only until xa is computed (before W's buffer is allocated).
    xa = _down(x2, _as(A, dt), seed, p)
    if x2.is_cuda and ops.BACKEND == "cuda":
        # On an H100 one kernel: the 4-bit GEMM with the up-projection as extra steps of its main
        # loop (Y written once, never read back). Elsewhere the same as below, with our dequantize.
        return (ops.gemm_4bit_lora(x2.contiguous(), packed, absmax, blocksize, quant_type, N, nested_absmax,
                                   nested_code, offset, nested_blocksize, xa, _as(B, dt), scale,
                                   None if bias is None else _as(bias, dt)).view(*lead, N),
                xa.view(*lead, xa.shape[-1]))
    # The LoRA term (and bias) first, then the base GEMM adds its product to it (cuBLAS' beta = 1):
    # the other order, base GEMM then Y += LoRA, costs one more full read and write of Y.
    if bias is not None:
        Y = torch.addmm(_as(bias, dt), xa, _as(B, dt).T, alpha=scale)
    else:
        Y = _scaled_mm(xa, _as(B, dt).T, scale)
    W = _dequantize(packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code, offset,
                    nested_blocksize, dt)
    Y.addmm_(x2, W.T)
    del W
    return Y.view(*lead, N), xa.view(*lead, xa.shape[-1])


# The two ops are defined with torch.library's low-level API (a schema and a Python kernel
# registered with the dispatcher), not torch.library.custom_op: custom_op wraps each call in
# argument normalization (inspect.signature), a dynamo-disable frame and its own autograd
# layer, ~100-200 us of CPU per call, and a compiled 7B training step makes ~670 such calls.
_LIB = torch.library.Library("qlora_kernels", "FRAGMENT")
_LIB.define(
    "matmul_4bit_lora(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int N, "
    "Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize, Tensor A, Tensor B, "
    "float scale, float p, Tensor? seed, Tensor? bias) -> (Tensor, Tensor)")
_LIB.define(
    "matmul_4bit_lora_backward(Tensor dY, Tensor x, Tensor packed, Tensor absmax, int blocksize, "
    "str quant_type, int N, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, int nested_blocksize, "
    "Tensor A, Tensor B, Tensor xa, float scale, float p, Tensor? seed, bool need_dx, bool need_dA, "
    "bool need_dB) -> (Tensor, Tensor, Tensor)")
_LIB.impl("matmul_4bit_lora", _forward_impl, "CompositeExplicitAutograd")
_forward = torch.ops.qlora_kernels.matmul_4bit_lora.default


@torch.library.register_fake("qlora_kernels::matmul_4bit_lora")
def _(x, packed, absmax, blocksize, quant_type, N, nested_absmax, nested_code, offset,
      nested_blocksize, A, B, scale, p, seed, bias):
    lead = x.shape[:-1]
    return x.new_empty((*lead, N)), x.new_empty((*lead, A.shape[0]))


def _scaled_mm(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """``scale * a @ b`` as one GEMM: the scale is cuBLAS's alpha (applied to the float32
    accumulator, one rounding), and beta = 0 makes it ignore the uninitialized output."""
    out = torch.empty((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    return out.addmm_(a, b, beta=0, alpha=scale)


def _backward_impl(dY: Tensor, x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str,
                   N: int, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
                   offset: Optional[Tensor], nested_blocksize: int, A: Tensor, B: Tensor, xa: Tensor,
                   scale: float, p: float, seed: Optional[Tensor], need_dx: bool, need_dA: bool,
                   need_dB: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dX in x's dtype, dA in A's, dB in B's); a gradient not needed is an empty tensor."""
    K = x.shape[-1]
    dt = x.dtype
    x2 = x.reshape(-1, K)
    dY2 = _as(dY.reshape(-1, N), dt)
    xa2 = xa.reshape(-1, xa.shape[-1])
    # gradients not needed: distinct empty tensors (custom-op outputs may not alias each other)
    dX, dA, dB = x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))
    if need_dB:
        dB = _as(_scaled_mm(dY2.T, xa2, scale), B.dtype)
    if need_dA or need_dx:
        A_ = _as(A, dt)
        g = _scaled_mm(dY2, _as(B, dt), scale)  # shared by dA and dX
        if need_dA:
            dA = _as(_grad_down(g, x2, seed, p), A.dtype)
        if need_dx:
            # as in forward: the LoRA term (through the dropout: the same mask scales the
            # gradient) first, then dX += dY @ W with the big GEMM's beta = 1
            dX = _up(g, A_, seed, p)
            if x2.is_cuda and ops.BACKEND == "cuda":
                # dX += dY @ W in place: on an H100 the 4-bit GEMM with W as the reduction side
                ops.gemm_4bit_add_(dX, dY2.contiguous(), packed, absmax, blocksize, quant_type, N, K,
                                   nested_absmax, nested_code, offset, nested_blocksize, True)
            else:
                W = _dequantize(packed, absmax, blocksize, quant_type, N, K, nested_absmax, nested_code,
                                offset, nested_blocksize, dt)
                dX.addmm_(dY2, W)
                del W
            dX = dX.view(x.shape)
    return dX, dA, dB


_LIB.impl("matmul_4bit_lora_backward", _backward_impl, "CompositeExplicitAutograd")
_backward = torch.ops.qlora_kernels.matmul_4bit_lora_backward.default


@torch.library.register_fake("qlora_kernels::matmul_4bit_lora_backward")
def _(dY, x, packed, absmax, blocksize, quant_type, N, nested_absmax, nested_code, offset,
      nested_blocksize, A, B, xa, scale, p, seed, need_dx, need_dA, need_dB):
    return (x.new_empty(x.shape) if need_dx else x.new_empty((0,)),
            A.new_empty(A.shape) if need_dA else x.new_empty((0,)),
            B.new_empty(B.shape) if need_dB else x.new_empty((0,)))


def _bias_grad(dY: Tensor, N: int, dtype: torch.dtype) -> Tensor:
    """dbias: dY summed over the tokens in float32 (float64 for float64), in the bias' dtype."""
    return dY.reshape(-1, N).sum(0, dtype=torch.promote_types(dY.dtype, torch.float32)).to(dtype)


# Argument positions of the forward op
_X, _A, _B, _BIAS = 0, 10, 11, 15


def _setup_context(ctx, inputs, output):
    (x, packed, absmax, blocksize, quant_type, N, nested_absmax, nested_code, offset, nested_blocksize,
     A, B, scale, p, seed, bias) = inputs
    _, xa = output
    ctx.mark_non_differentiable(xa)
    ctx.save_for_backward(x, packed, absmax, nested_absmax, nested_code, offset, A, B, xa, seed)
    ctx.args = (blocksize, quant_type, N, nested_blocksize, scale, p)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward_rule(ctx, dY, _dxa):
    x, packed, absmax, nested_absmax, nested_code, offset, A, B, xa, seed = ctx.saved_tensors
    blocksize, quant_type, N, nested_blocksize, scale, p = ctx.args
    need = ctx.needs_input_grad
    grads = [None] * 16
    if need[_X] or need[_A] or need[_B]:
        dX, dA, dB = _backward(dY, x, packed, absmax, blocksize, quant_type, N, nested_absmax,
                               nested_code, offset, nested_blocksize, A, B, xa, scale, p, seed,
                               need[_X], need[_A], need[_B])
        grads[_X] = dX if need[_X] else None
        grads[_A] = dA if need[_A] else None
        grads[_B] = dB if need[_B] else None
    if need[_BIAS]:
        grads[_BIAS] = _bias_grad(dY, N, ctx.bias_dtype)
    return tuple(grads)


torch.library.register_autograd("qlora_kernels::matmul_4bit_lora", _backward_rule,
                                setup_context=_setup_context)


class _EagerLoRA(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager mode.

    An op with a registered autograd formula still pays for the dispatcher's autograd kernel
    and a Python kernel per call, twice per layer and step; a training step of a 7B model
    makes hundreds of them, and on an H100 it was CPU-bound (~680 ms wall for 254 ms of GPU
    kernels, with torch.library.custom_op). Outside torch.compile this plain autograd.Function
    runs the same implementation functions with less overhead; under torch.compile the ops
    are used (the compiler needs their schemas and fake kernels)."""

    @staticmethod
    def forward(ctx, x, A, B, bias, packed, absmax, nested_absmax, nested_code, offset, seed, args):
        blocksize, quant_type, N, nested_blocksize, scale, p = args
        Y, xa = _forward_impl(x, packed, absmax, blocksize, quant_type, N, nested_absmax, nested_code, offset,
                              nested_blocksize, A, B, scale, p, seed, bias)
        ctx.save_for_backward(x, packed, absmax, nested_absmax, nested_code, offset, A, B, xa, seed)
        ctx.args = args
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return Y

    @staticmethod
    def backward(ctx, dY):
        x, packed, absmax, nested_absmax, nested_code, offset, A, B, xa, seed = ctx.saved_tensors
        blocksize, quant_type, N, nested_blocksize, scale, p = ctx.args
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[:4]
        dX = dA = dB = dbias = None
        if need_x or need_A or need_B:
            dX, dA, dB = _backward_impl(dY, x, packed, absmax, blocksize, quant_type, N, nested_absmax,
                                        nested_code, offset, nested_blocksize, A, B, xa, scale, p, seed,
                                        need_x, need_A, need_B)
            dX, dA, dB = (dX if need_x else None), (dA if need_A else None), (dB if need_B else None)
        if need_bias:
            dbias = _bias_grad(dY, N, ctx.bias_dtype)
        return dX, dA, dB, dbias, None, None, None, None, None, None, None


def _check_weight(name: str, t, shape: tuple[int, int], device) -> None:
    _check_tensor(name, t, X_DTYPES)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape [{shape[0]}, {shape[1]}], got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of x), got {t.device}")


def _check_seed(seed, device) -> None:
    if not isinstance(seed, Tensor):
        raise TypeError(f"seed: expected an int64 tensor of one element, got {type(seed).__name__}")
    if seed.dtype != torch.int64 or seed.numel() != 1:
        raise ValueError(f"seed: expected an int64 tensor of one element, got {seed.dtype} of shape {list(seed.shape)}")
    if seed.device.type != "cpu" and seed.device != device:
        raise ValueError(f"seed: expected a tensor on the CPU or on {device} (the device of x), got {seed.device}")


def matmul_4bit_lora(x: Tensor, packed: Tensor, state: QuantState, A: Tensor, B: Tensor, scale: float,
                     dropout_p: float = 0.0, bias: Tensor | None = None, *,
                     generator: torch.Generator | None = None, seed: Tensor | None = None) -> Tensor:
    """``x @ W.T + scale * dropout(x) @ A.T @ B.T (+ bias)``, differentiable in x, A, B, bias.

    ``(packed, state)``: W ``[N, K]`` in 4 bits (frozen: no gradient). ``x``: ``[..., K]``,
    bfloat16 or float16 (training), float32, or float64 on CPU. ``A``: ``[r, K]``, ``B``:
    ``[N, r]``, any float dtype (fp32 master copies are cast to x's dtype inside; their
    gradients come back in their own dtype). ``bias``: ``[N]`` or None. ``dropout_p`` in
    [0, 1): dropout on the LoRA branch's input (0 skips it entirely); its mask comes from a seed
    drawn from ``generator`` (default: torch's default CPU generator) and is regenerated in
    backward. ``seed``, if given, is that seed instead: an int64 tensor of one element on the CPU
    or on x's device (read by the kernels when they run, as a CUDA graph needs); the same seed
    gives the same mask.
    Returns ``[..., N]`` in x's dtype (cuBLAS accumulates in float32).
    """
    N, K = check_x_and_weight(x, packed, state, X_DTYPES)
    if x.dtype == torch.float64 and x.device.type != "cpu":
        raise ValueError("x: float64 is supported on CPU only (the kernels take bf16, fp16, fp32)")
    if not isinstance(A, Tensor):
        raise TypeError(f"A: expected a torch.Tensor, got {type(A).__name__}")
    if A.dim() != 2 or A.shape[1] != K:
        raise ValueError(f"A: expected shape [r, {K}], got {list(A.shape)}")
    r = A.shape[0]
    _check_weight("A", A, (r, K), x.device)
    _check_weight("B", B, (N, r), x.device)
    if bias is not None:
        _check_tensor("bias", bias, X_DTYPES)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias: expected shape [{N}], got {list(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias: expected a tensor on {x.device} (the device of x), got {bias.device}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    p = float(dropout_p)
    if seed is not None:
        _check_seed(seed, x.device)
        seed = seed.reshape(()) if p > 0.0 else None
    elif p > 0.0:
        seed = draw_seed(generator)
    nested_absmax, nested_code, offset, nested_blocksize = _nested_args(state)
    if not torch.compiler.is_compiling():
        return _EagerLoRA.apply(x, A, B, bias, packed.contiguous(), state.absmax.contiguous(), nested_absmax,
                                nested_code, offset, seed,
                                (state.blocksize, state.quant_type, N, nested_blocksize, float(scale), p))
    Y, _ = _forward(x, packed.contiguous(), state.absmax.contiguous(), state.blocksize, state.quant_type, N,
                    nested_absmax, nested_code, offset, nested_blocksize, A, B, float(scale), p, seed, bias)
    return Y
