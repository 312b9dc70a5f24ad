"""On a GPU: the CUDA extension and the Triton kernels against the torch reference (run on the
same GPU), bytes and values bit for bit, over every blocksize, input dtype, quant type, with
and without double quant, and awkward sizes. Skipped without a GPU."""

import re

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import codes, reference

pytestmark = pytest.mark.gpu

BLOCKSIZES = list(codes.BLOCKSIZES)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 2, 63, 64, 65, 1000, 4160 * 257]


def implementations():
    impls = []
    if qk.backend() == "cuda":
        impls.append(pytest.param("cuda", id="cuda"))
    impls.append(pytest.param("triton", id="triton"))
    return impls


def ops_of(name):
    if name == "cuda":
        return torch.ops.qlora_kernels
    pytest.importorskip("triton")
    from qlora_kernels.triton import quant

    return quant


def _call(impl, op, *args):
    fn = getattr(impl, op)
    return fn.default(*args) if hasattr(fn, "default") else fn(*args)


def weights(n, dtype, rng, scale=0.05):
    W = torch.randn(n, generator=rng) * scale
    if n > 200:
        W[64:128] = 0.0  # one all-zero block (for blocksizes <= 64)
        W[-7:] *= 300.0  # a block with outliers
    return W.to(dtype).cuda()


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
def test_quantize_4bit_bit_exact(impl, quant_type, dtype, blocksize, n, rng):
    ops = ops_of(impl)
    A = weights(n, dtype, rng)
    packed, absmax = _call(ops, "quantize_4bit", A, blocksize, quant_type)
    ref_packed, ref_absmax = reference.quantize_4bit(A, blocksize, quant_type)
    assert packed.shape == ref_packed.shape and packed.dtype == torch.uint8
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(packed, ref_packed), f"{(packed != ref_packed).sum().item()} bytes differ"


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("nested", [True, False], ids=["dq", "plain"])
def test_dequantize_4bit_bit_exact(impl, quant_type, dtype, blocksize, n, nested, rng):
    ops = ops_of(impl)
    A = weights(n, torch.float32, rng)
    packed, absmax = reference.quantize_4bit(A, blocksize, quant_type)
    if nested:
        code8 = codes.dynamic_map("cuda")
        offset = absmax.mean()
        q, nabs = reference.quantize_8bit(absmax, offset, code8, 256)
        args = (packed, q, blocksize, quant_type, n, dtype, nabs, code8, offset, 256)
    else:
        args = (packed, absmax, blocksize, quant_type, n, dtype)
    out = _call(ops, "dequantize_4bit", *args)
    ref = reference.dequantize_4bit(*args)
    assert out.shape == (n,) and out.dtype == dtype
    assert torch.equal(out, ref), f"{(out != ref).sum().item()} values differ"


@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("n", [1, 255, 256, 257, 70000])
def test_8bit_absmax_quant_bit_exact(impl, n, rng):
    ops = ops_of(impl)
    absmax = (torch.rand(n, generator=rng) * 0.1 + 0.01).cuda()
    code8 = codes.dynamic_map("cuda")
    offset = absmax.mean()
    q, nabs = _call(ops, "quantize_8bit", absmax, offset, code8, 256)
    rq, rnabs = reference.quantize_8bit(absmax, offset, code8, 256)
    assert torch.equal(nabs, rnabs) and torch.equal(q, rq)
    out = _call(ops, "dequantize_8bit", q, nabs, code8, offset, 256)
    assert torch.equal(out, reference.dequantize_8bit(q, nabs, code8, offset, 256))


@pytest.mark.parametrize("impl", implementations())
def test_unaligned_and_offset_views(impl, rng):
    ops = ops_of(impl)
    big = weights(4160 * 3 + 9, torch.bfloat16, rng)
    A = big[1:]  # contiguous, but its data pointer is 2 bytes past a 16-byte boundary
    p, a = _call(ops, "quantize_4bit", A, 64, "nf4")
    rp, ra = reference.quantize_4bit(A, 64, "nf4")
    assert torch.equal(p, rp) and torch.equal(a, ra)
    packed_view = rp.reshape(-1)[1:]  # one byte past the allocation's start
    m = 2 * packed_view.numel()
    absmax = (torch.rand(-(-m // 64), generator=rng) + 0.5).cuda()
    out = _call(ops, "dequantize_4bit", packed_view, absmax, 64, "nf4", m, torch.bfloat16)
    ref = reference.dequantize_4bit(packed_view, absmax, 64, "nf4", m, torch.bfloat16)
    assert torch.equal(out, ref)


@pytest.mark.slow
@pytest.mark.parametrize("impl", implementations())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_llama70b_mlp_shape_bit_exact(impl, quant_type, rng):
    """28672 x 8192 (235M weights, > 2^27 bytes packed): the full public API path."""
    ops = ops_of(impl)
    W = (torch.randn(28672, 8192, device="cuda", dtype=torch.bfloat16) * 0.02)
    packed, absmax = _call(ops, "quantize_4bit", W, 64, quant_type)
    ref_packed, ref_absmax = reference.quantize_4bit(W, 64, quant_type)
    assert torch.equal(absmax, ref_absmax)
    assert torch.equal(packed, ref_packed)
    del ref_packed
    code8 = codes.dynamic_map("cuda")
    offset = absmax.mean()
    q, nabs = _call(ops, "quantize_8bit", absmax, offset, code8, 256)
    args = (packed, q, 64, quant_type, W.numel(), torch.bfloat16, nabs, code8, offset, 256)
    out = _call(ops, "dequantize_4bit", *args)
    assert torch.equal(out, reference.dequantize_4bit(*args))


def test_public_api_matches_reference_on_gpu(rng):
    W = weights(4160 * 257, torch.bfloat16, rng).view(4160, 257)
    packed, state = qk.quantize_4bit(W)
    ref_packed, ref_absmax = reference.quantize_4bit(W, 64, "nf4")
    assert torch.equal(packed, ref_packed)
    out = qk.dequantize_4bit(packed, state)
    ref = reference.dequantize_4bit(packed, state.absmax, 64, "nf4", W.numel(), torch.bfloat16,
                                    state.state2.absmax, state.state2.code, state.offset, 256)
    assert torch.equal(out.reshape(-1), ref)


@pytest.mark.skipif(qk.backend() != "cuda", reason="the CUDA extension is not loaded")
def test_cuda_host_checks_raise_instead_of_crashing():
    """Every argument check of the C++ host code raises a RuntimeError naming the argument
    (the Python API checks first, so only direct op calls reach these)."""
    ops = torch.ops.qlora_kernels
    A = torch.randn(300, device="cuda")
    code8 = codes.dynamic_map("cuda")
    packed, absmax = ops.quantize_4bit(A, 64, "nf4")
    offset = absmax.mean()
    q, nabs = ops.quantize_8bit(absmax, offset, code8, 256)
    cases = [
        (lambda: ops.quantize_4bit(A, 48, "nf4"), "blocksize: expected a power of two in 32..4096, got 48"),
        (lambda: ops.quantize_4bit(A.to(torch.int32), 64, "nf4"), "A: expected dtype"),
        (lambda: ops.quantize_4bit(A.cpu().to(torch.bfloat16).cuda()[::2], 64, "nf4"), "A: expected a contiguous tensor"),
        (lambda: ops.quantize_4bit(A, 64, "int4"), 'quant_type: expected "nf4" or "fp4"'),
        (lambda: ops.dequantize_4bit(packed[:-1], absmax, 64, "nf4", 300, torch.bfloat16), "packed: expected 150 elements"),
        (lambda: ops.dequantize_4bit(packed, absmax[:-1], 64, "nf4", 300, torch.bfloat16), "absmax: expected 5 elements"),
        (lambda: ops.dequantize_4bit(packed, q, 64, "nf4", 300, torch.bfloat16, nabs[:0], code8, offset, 256), "nested_absmax: expected 1 elements"),
        (lambda: ops.dequantize_4bit(packed, absmax, 64, "nf4", 300, torch.bfloat16, nabs, code8, offset, 256), "absmax: expected dtype"),
        (lambda: ops.dequantize_8bit(q, nabs, code8[:10], offset, 256), "code: expected 256 elements"),
        (lambda: ops.quantize_8bit(absmax, offset.cpu(), code8, 256), "offset: expected a CUDA tensor"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            call()
