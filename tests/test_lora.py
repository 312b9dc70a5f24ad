"""The QLoRA training op (matmul_4bit_lora), its seeded dropout, LoRALinear4bit and add_lora.

CPU tests run the torch reference (and the Triton dropout kernels in the interpreter); tests
marked gpu run the active backend (the CUDA extension or Triton) on CUDA tensors, and run the
gradient tests once more in a subprocess with QLORA_KERNELS_BACKEND=triton.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import lora, ops, reference
from qlora_kernels.nn import Linear4bit, LoRALinear4bit

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK32 = 0xFFFFFFFF


def randn(shape, dtype, device, rng, scale=1.0):
    return (torch.randn(shape, generator=rng) * scale).to(dtype).to(device)


def quantized(N, K, device, rng, **kw):
    W = randn((N, K), torch.float32, device, rng, scale=0.05)
    return qk.quantize_4bit(W, **kw)


def rel_err(got, want):
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def seed_of(rng):
    return int(torch.randint(0, 2**63 - 1, (), generator=rng))


# ---------------------------------------------------------------------------------------------
# The seeded dropout ops


def test_reference_philox_known_answer():
    # Random123's known-answer vector for philox4x32_10, counter 0 and key 0
    r = reference.philox4x32_10(torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), 0)
    assert r[0].tolist() == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_reference_philox_matches_a_plain_python_philox(rng):
    # the int64-tensor emulation of 32-bit multiplies against Python's exact integers
    def philox(c, k):
        c, k = list(c), list(k)
        for _ in range(10):
            p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
            c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & MASK32, (p0 >> 32) ^ c[3] ^ k[1], p0 & MASK32]
            k = [(k[0] + 0x9E3779B9) & MASK32, (k[1] + 0xBB67AE85) & MASK32]
        return c

    g = torch.randint(0, 2**62, (20,), generator=rng)
    g[:3] = torch.tensor([0, MASK32, 2**32])  # carries between the counter words
    for seed in (seed_of(rng), -1, 0):
        got = reference.philox4x32_10(g & MASK32, g >> 32, seed)
        for i, gi in enumerate(g.tolist()):
            k = seed & (2**64 - 1)
            assert got[i].tolist() == philox([gi & MASK32, gi >> 32, 0, 0], [k & MASK32, k >> 32])


def dropout_impls(device):
    """(name, forward, backward_add) for every implementation that serves `device`."""
    impls = [("op", ops.dropout_forward, ops.dropout_backward_add)]
    if device == "cuda":
        from qlora_kernels.triton import dropout as T

        impls.append(("triton", T.dropout_forward, T.dropout_backward_add))
    return impls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dropout_mask_properties(device, dtype, rng):
    n = 3 * 4160 + 7
    # |x| >= 0.5: an element is zero in the output exactly when it was dropped
    x = (torch.randn((3, n // 3), generator=rng).abs() + 0.5).to(dtype).to(device)
    for name, forward, backward_add in dropout_impls(device):
        for p in (0.1, 0.5, 0.9):
            seed = seed_of(rng)
            y = forward(x, seed, p)
            assert y.shape == x.shape and y.dtype == x.dtype
            assert torch.equal(forward(x, seed, p), y), f"{name}: same seed, different mask"
            keep = y != 0
            assert not torch.equal(forward(x, seed + 1, p) != 0, keep), f"{name}: seeds give one mask"
            # kept: x / (1 - p) in float32, rounded once; dropped: +0
            want = torch.where(keep, (x.float() * reference.dropout_scale(p)).to(dtype), 0.0)
            assert torch.equal(y, want)
            # keep rate ~ 1 - p: within 6 standard deviations of a binomial
            rate = keep.double().mean().item()
            assert abs(rate - (1 - p)) < 6 * math.sqrt(p * (1 - p) / x.numel()), (name, p, rate)
            # backward uses the very same mask
            out = randn(x.shape, dtype, device, rng)
            grad = randn(x.shape, dtype, device, rng)
            expect = (out.float() + torch.where(keep, grad.float() * reference.dropout_scale(p), 0.0)).to(dtype)
            backward_add(out, grad, seed, p)
            assert torch.equal(out, expect), f"{name}: backward's mask differs from forward's"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dropout_kernels_bit_exact_with_reference(dtype, rng):
    for name, forward, backward_add in dropout_impls("cuda"):
        for n in (1, 3, 4, 5, 7, 8, 9, 63, 1000, 4160 * 257 + 3):
            base = randn((n + 1,), dtype, "cuda", rng)
            for x in (base[:n], base[1:]):  # aligned, and one element past 16 bytes
                for p in (1e-4, 0.1, 0.75):
                    seed = seed_of(rng)
                    assert torch.equal(forward(x, seed, p), reference.dropout_forward(x, seed, p)), (name, n, p)
                    out = randn((n + 1,), dtype, "cuda", rng)[1:]
                    want = out.clone()
                    backward_add(out, x, seed, p)
                    reference.dropout_backward_add(want, x, seed, p)
                    assert torch.equal(out, want), (name, n, p)


@pytest.mark.skipif(HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton interpreter runs without a GPU (on a GPU the compiled kernels are tested)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_dropout_in_interpreter(dtype, rng):
    from qlora_kernels.triton import dropout as T

    def same(a, b):
        if dtype == torch.bfloat16:  # the interpreter truncates to bf16 where GPUs round: 1 ulp
            return bool(((a.view(torch.int16).int() - b.view(torch.int16).int()).abs() <= 1).all())
        return torch.equal(a, b)

    for n in (1, 5, 4099, 9000):
        x = randn((n,), dtype, "cpu", rng)
        seed, p = seed_of(rng), 0.3
        assert same(T.dropout_forward(x, seed, p), reference.dropout_forward(x, seed, p))
        out = randn((n,), dtype, "cpu", rng)
        want = out.clone()
        T.dropout_backward_add(out, x, seed, p)
        reference.dropout_backward_add(want, x, seed, p)
        assert same(out, want)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_opcheck(device, rng):
    for dtype in (torch.float32, torch.bfloat16):
        x = randn((7, 33), dtype, device, rng)
        torch.library.opcheck(ops.dropout_forward, (x, seed_of(rng), 0.25))
        torch.library.opcheck(ops.dropout_backward_add, (randn((7, 33), dtype, device, rng), x, seed_of(rng), 0.25))


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_device_seed_is_the_seed(device, rng):
    # a seed held in a tensor (read by the kernel at run time, as a CUDA graph needs) draws the
    # mask of the same seed passed by value; the int argument is then ignored
    impls = dropout_impls(device)
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and not HAS_CUDA:
        from qlora_kernels.triton import dropout as T

        impls.append(("triton-interpreter", T.dropout_forward, T.dropout_backward_add))
    for name, forward, backward_add in impls:
        for n in (5, 4160 + 3):
            x = randn((n,), torch.bfloat16, device, rng)
            seed = seed_of(rng)
            held = torch.tensor([seed], dtype=torch.int64, device=device)
            want = forward(x, seed, 0.3)
            assert torch.equal(forward(x, seed + 12345, 0.3, held), want), name
            out = randn((n,), torch.bfloat16, device, rng)
            ref = out.clone()
            backward_add(out, x, seed + 1, 0.3, held)
            backward_add(ref, x, seed, 0.3)
            assert torch.equal(out, ref), name
            # a new value in the same tensor: a new mask
            held.fill_(seed + 1)
            assert torch.equal(forward(x, 0, 0.3, held), forward(x, seed + 1, 0.3)), name
            if n > 100:  # 5 elements keep the same mask under two seeds with probability 0.58^5
                assert not torch.equal(forward(x, 0, 0.3, held), want), name


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_device_seed_checks_name_it(device):
    x = torch.randn(8, 8, device=device)
    for bad, match in ((torch.tensor([1], dtype=torch.int32, device=device), "device_seed: expected an int64"),
                       (torch.tensor([1, 2], device=device), "device_seed: expected .*one element")):
        with pytest.raises((ValueError, RuntimeError), match=match):
            ops.dropout_forward(x, 0, 0.5, bad)
        with pytest.raises((ValueError, RuntimeError), match=match):
            ops.dropout_backward_add(x, x.clone(), 0, 0.5, bad)


@pytest.mark.gpu
@pytest.mark.skipif(qk.backend() != "cuda", reason="the CUDA extension is not loaded")
def test_cuda_dropout_device_seed_on_another_device_raises():
    x = torch.randn(8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="device_seed: expected a tensor on cuda:0 \\(the device of x\\)"):
        ops.dropout_forward(x, 0, 0.5, torch.tensor([1]))


@pytest.mark.parametrize("device", DEVICES)
def test_lora_seed_argument(device, rng):
    # seed=: the caller's seed instead of a draw; on the CPU or on x's device the same mask
    packed, state, x, A, B, b = lora_inputs(9, 130, 40, 8, torch.bfloat16, device, rng)
    seed = seed_of(rng)

    def run(s):
        for t in (x, A, B, b):
            t.grad = None
        rng_state = torch.get_rng_state()
        y = qk.matmul_4bit_lora(x, packed, state, A, B, 0.5, 0.3, b, seed=s)
        y.float().square().sum().backward()
        assert torch.equal(torch.get_rng_state(), rng_state)  # no seed drawn
        return [y.detach()] + [t.grad.clone() for t in (x, A, B, b)]

    on_cpu = run(torch.tensor(seed))
    on_device = run(torch.tensor([seed], device=device))
    for got, want in zip(on_device, on_cpu):
        assert torch.equal(got, want)
    # another seed, another mask
    other = run(torch.tensor(seed + 1))
    assert not torch.equal(other[0], on_cpu[0])
    with pytest.raises(ValueError, match="seed: expected an int64 tensor of one element"):
        qk.matmul_4bit_lora(x, packed, state, A, B, 0.5, 0.3, b, seed=torch.tensor([1.0]))
    with pytest.raises(TypeError, match="seed: expected an int64 tensor"):
        qk.matmul_4bit_lora(x, packed, state, A, B, 0.5, 0.3, b, seed=7)


@pytest.mark.gpu
@pytest.mark.skipif(qk.backend() != "cuda", reason="the CUDA extension is not loaded")
def test_cuda_dropout_host_checks_raise():
    x = torch.randn(8, 8, device="cuda")
    with pytest.raises(RuntimeError, match=r"p: expected a dropout probability in \[0, 1\), got 1"):
        ops.dropout_forward(x, 1, 1.0)
    with pytest.raises(RuntimeError, match="x: expected a contiguous tensor"):
        ops.dropout_forward(x.t(), 1, 0.5)
    with pytest.raises(RuntimeError, match="x: expected dtype float32, float16 or bfloat16"):
        ops.dropout_forward(x.double(), 1, 0.5)
    with pytest.raises(RuntimeError, match=r"grad: expected the shape of out \[8, 8\], got \[4, 16\]"):
        ops.dropout_backward_add(x, x.view(4, 16), 1, 0.5)
    with pytest.raises(RuntimeError, match="grad: expected the dtype of out"):
        ops.dropout_backward_add(x, x.half(), 1, 0.5)


# ---------------------------------------------------------------------------------------------
# The dropout fused into the LoRA matmuls: dropout_linear (dropout(x) @ w.T), matmul_dropout
# (dropout(a @ b)) and dropout_grad_weight (g.T @ dropout(x))

# (M, K, r): sizes the fused CUDA kernels take (K % 8 == 0, r <= 64), with tails in M, K and
# r, and sizes they hand to the unfused ops (K % 8 != 0, r > 64)
THIN_SHAPES = [(1, 8, 1), (7, 264, 16), (130, 4160, 64), (33, 520, 40), (300, 1032, 5), (45, 392, 24),
               (1100, 264, 24), (65, 257, 8), (20, 96, 80)]  # 1100: dropout_grad_weight splits the tokens


def thin_impls(device):
    """(name, dropout_linear, matmul_dropout) for every implementation that serves `device`."""
    impls = [("op", ops.dropout_linear, ops.matmul_dropout)]
    if device == "cuda":
        from qlora_kernels.triton import dropout as T

        impls.append(("triton", T.dropout_linear, T.matmul_dropout))
    return impls


def grad_weight_impls(device):
    """(name, dropout_grad_weight) for every implementation that serves `device`."""
    impls = [("op", ops.dropout_grad_weight)]
    if device == "cuda":
        from qlora_kernels.triton import dropout as T

        impls.append(("triton", T.dropout_grad_weight))
    return impls


def misaligned(t):
    """A contiguous copy of t that starts 2 bytes past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 8, dtype=t.dtype, device=t.device)
    out = flat[1:1 + t.numel()].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_linear_masks_and_rounds_like_dropout_forward(dtype, rng):
    # weight rows that each pick one column of x: out[:, i] = dropout_forward(x)[:, cols[i]]
    # exactly (one product by 1 per sum), so every element's mask and rounding is checked
    for M, K in ((130, 264), (5, 64), (67, 4160), (9, 100)):
        x = randn((M, K), dtype, "cuda", rng)
        seed, p = seed_of(rng), 0.3
        want = reference.dropout_forward(x, seed, p)
        for name, dropout_linear, _ in thin_impls("cuda"):
            for first in range(0, K, 64):
                cols = torch.arange(first, min(first + 64, K))
                weight = torch.zeros((len(cols), K), dtype=dtype)
                weight[torch.arange(len(cols)), cols] = 1.0
                got = dropout_linear(x, weight.to("cuda"), seed, p)
                assert torch.equal(got, want[:, cols.cuda()]), (name, M, K, first)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_dropout_rounds_like_dropout_forward(dtype, rng):
    # one-hot rows of a pick rows of b: a @ b is exact, so the fused op must equal the unfused
    # dropout_forward(b[rows]) bit for bit (the product rounded to dtype, then masked and scaled)
    for M, K, r in ((130, 264, 64), (37, 4160, 24), (9, 64, 5), (300, 1032, 16)):
        b = randn((r, K), dtype, "cuda", rng)
        rows = torch.randint(0, r, (M,), generator=rng).cuda()
        a = torch.nn.functional.one_hot(rows, r).to(dtype)
        seed = seed_of(rng)
        for name, _, matmul_dropout in thin_impls("cuda"):
            got = matmul_dropout(a, b, seed, 0.3)
            assert torch.equal(got, reference.dropout_forward(b[rows], seed, 0.3)), (name, M, K, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dropout_grad_weight_masks_and_rounds_like_dropout_forward(dtype, rng):
    # g with one 1 per column, in distinct rows: row j of g.T @ dropout(x) is dropout_forward(x)
    # at row m_j exactly (one product by 1, the rest exact zeros), so every chosen row's mask and
    # rounding is checked; M >= 512 takes the kernel's split over the tokens
    for M, K, r in ((130, 264, 64), (37, 4160, 24), (9, 64, 5), (700, 264, 16), (1100, 8, 3), (300, 1032, 40)):
        x = randn((M, K), dtype, "cuda", rng)
        seed, p = seed_of(rng), 0.3
        want = reference.dropout_forward(x, seed, p)
        rows = torch.randperm(M, generator=rng)[:r].cuda()
        g = torch.zeros((M, r), dtype=dtype, device="cuda")
        g[rows, torch.arange(r, device="cuda")] = 1.0
        for name, grad_weight in grad_weight_impls("cuda"):
            got = grad_weight(g, x, seed, p)
            assert torch.equal(got, want[rows]), (name, M, K, r)


@pytest.mark.gpu
@pytest.mark.skipif(qk.backend() != "cuda", reason="the CUDA extension is not loaded")
def test_fused_dropout_kernels_run_where_they_should():
    # the fused kernels, not the unfused fallback, on a fusable size; the fallback on K % 8 != 0
    def kernels(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return " ".join(e.name for e in prof.events())

    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16)
    assert "dropout_linear_kernel" in kernels(lambda: ops.dropout_linear(x, w, 1, 0.1))
    assert "matmul_dropout_kernel" in kernels(lambda: ops.matmul_dropout(g, w, 1, 0.1))
    assert "dropout_grad_weight_kernel" in kernels(lambda: ops.dropout_grad_weight(g, x, 1, 0.1))
    x_odd, w_odd = x[:, :255].contiguous(), w[:, :255].contiguous()
    names = kernels(lambda: ops.dropout_linear(x_odd, w_odd, 1, 0.1))
    assert "dropout_linear_kernel" not in names and "dropout_kernel" in names
    names = kernels(lambda: ops.dropout_grad_weight(g, x_odd, 1, 0.1))
    assert "dropout_grad_weight_kernel" not in names and "dropout_kernel" in names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_dropout_matmuls_against_float64(device, dtype, rng):
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    shapes = THIN_SHAPES if device == "cuda" else THIN_SHAPES[:2] + THIN_SHAPES[-2:]
    for M, K, r in shapes:
        seed, p = seed_of(rng), 0.2
        x = randn((M, K), dtype, device, rng)
        w = randn((r, K), dtype, device, rng, scale=0.1)
        g = randn((M, r), dtype, device, rng)
        keep = reference.dropout_keep(M * K, seed, p, device).view(M, K)
        xd = reference.dropout_forward(x, seed, p).double()
        want_down = xd @ w.double().T
        prod = g.double() @ w.double()  # exact: products of 16-bit floats, summed in float64
        want_up = torch.where(keep, prod * reference.dropout_scale(p), 0.0)
        # where a kept product is clearly nonzero, so is its output (near-zero sums say nothing:
        # a few cancel exactly in 16-bit products, fp16 flushes |a @ b| < 2^-25 to zero, and the
        # unfused path's cuBLAS may reduce in 16 bits: at 1e-3 of the largest product, bf16 with
        # r = 24 and a misaligned a, the unfused path gave one kept zero in about 1 run of 9)
        clear = prod.abs() > 1e-2 * prod.abs().max()
        for name, dropout_linear, matmul_dropout in thin_impls(device):
            for variant, (x_, w_, g_) in (("aligned", (x, w, g)), ("misaligned", (misaligned(x), w, misaligned(g)))):
                down = dropout_linear(x_, w_, seed, p)
                assert down.shape == (M, r) and down.dtype == dtype
                torch.testing.assert_close(down.double(), want_down, rtol=tol, atol=tol * want_down.abs().max(),
                                           msg=lambda m: f"{name} {variant} dropout_linear {M}x{K} r={r}: {m}")
                up = matmul_dropout(g_, w_, seed, p)
                assert up.shape == (M, K) and up.dtype == dtype
                # an output is zero exactly where dropped
                assert torch.equal((up != 0)[clear], keep[clear]), (name, variant, M, K, r)
                torch.testing.assert_close(up.double(), want_up, rtol=tol, atol=tol * want_up.abs().max(),
                                           msg=lambda m: f"{name} {variant} matmul_dropout {M}x{K} r={r}: {m}")
        want_gw = g.double().T @ xd
        # (misaligned operands take the CUDA op's unfused path: that path is checked too)
        for name, grad_weight in grad_weight_impls(device):
            for variant, (g_, x_) in (("aligned", (g, x)), ("misaligned", (misaligned(g), misaligned(x)))):
                gw = grad_weight(g_, x_, seed, p)
                assert gw.shape == (r, K) and gw.dtype == dtype
                torch.testing.assert_close(gw.double(), want_gw, rtol=tol, atol=tol * want_gw.abs().max(),
                                           msg=lambda m: f"{name} {variant} dropout_grad_weight {M}x{K} r={r}: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_fused_dropout_matmuls_device_seed_and_opcheck(device, rng):
    x = randn((37, 136), torch.bfloat16, device, rng)
    w = randn((16, 136), torch.bfloat16, device, rng)
    g = randn((37, 16), torch.bfloat16, device, rng)
    seed = seed_of(rng)
    held = torch.tensor([seed], dtype=torch.int64, device=device)
    assert torch.equal(ops.dropout_linear(x, w, seed + 1, 0.4, held), ops.dropout_linear(x, w, seed, 0.4))
    assert torch.equal(ops.matmul_dropout(g, w, seed + 1, 0.4, held), ops.matmul_dropout(g, w, seed, 0.4))
    assert not torch.equal(ops.matmul_dropout(g, w, seed + 1, 0.4), ops.matmul_dropout(g, w, seed, 0.4))
    assert torch.equal(ops.dropout_grad_weight(g, x, seed + 1, 0.4, held), ops.dropout_grad_weight(g, x, seed, 0.4))
    assert not torch.equal(ops.dropout_grad_weight(g, x, seed + 1, 0.4), ops.dropout_grad_weight(g, x, seed, 0.4))
    torch.library.opcheck(ops.dropout_linear, (x, w, seed, 0.4))
    torch.library.opcheck(ops.matmul_dropout, (g, w, seed, 0.4))
    torch.library.opcheck(ops.dropout_grad_weight, (g, x, seed, 0.4))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_dropout_matmuls_bad_input_names_the_argument(device, rng):
    x = randn((6, 24), torch.bfloat16, device, rng)
    w = randn((4, 24), torch.bfloat16, device, rng)
    g = randn((6, 4), torch.bfloat16, device, rng)
    err = (ValueError, RuntimeError)
    with pytest.raises(err, match="weight: expected"):
        ops.dropout_linear(x, w[:, :16].contiguous(), 1, 0.5)
    with pytest.raises(err, match="weight: expected the dtype of x"):
        ops.dropout_linear(x, w.half(), 1, 0.5)
    with pytest.raises(err, match="x: expected a 2-D tensor"):
        ops.dropout_linear(x.view(2, 3, 24), w, 1, 0.5)
    with pytest.raises(err, match="b: expected"):
        ops.matmul_dropout(g, w[:3].contiguous(), 1, 0.5)
    with pytest.raises(err, match="b: expected the dtype of a"):
        ops.matmul_dropout(g, w.float(), 1, 0.5)
    with pytest.raises(err, match="x: expected"):
        ops.dropout_grad_weight(g, x[:5].contiguous(), 1, 0.5)
    with pytest.raises(err, match="x: expected the dtype of g"):
        ops.dropout_grad_weight(g, x.half(), 1, 0.5)
    with pytest.raises(err, match="g: expected a 2-D tensor"):
        ops.dropout_grad_weight(g.view(2, 3, 4), x, 1, 0.5)
    if device == "cuda" and qk.backend() == "cuda":
        with pytest.raises(RuntimeError, match=r"p: expected a dropout probability in \[0, 1\)"):
            ops.matmul_dropout(g, w, 1, 1.0)
        with pytest.raises(RuntimeError, match="weight: expected a CUDA tensor"):
            ops.dropout_linear(x, w.cpu(), 1, 0.5)
        with pytest.raises(RuntimeError, match="x: expected a CUDA tensor"):
            ops.dropout_grad_weight(g, x.cpu(), 1, 0.5)


# ---------------------------------------------------------------------------------------------
# matmul_4bit_lora: gradients


def lora_inputs(M, K, N, r, dtype, device, rng, lead=None, bias=True, param_dtype=None, **quant):
    packed, state = quantized(N, K, device, rng, **quant)
    param_dtype = param_dtype or dtype
    x = randn(lead or (M, K), dtype, device, rng).requires_grad_()
    A = randn((r, K), param_dtype, device, rng, scale=1 / math.sqrt(K)).requires_grad_()
    B = randn((N, r), param_dtype, device, rng, scale=0.5).requires_grad_()
    b = randn((N,), param_dtype, device, rng).requires_grad_() if bias else None
    return packed, state, x, A, B, b


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("quant", [dict(), dict(quant_type="fp4", blocksize=128, double_quant=False)],
                         ids=["nf4-dq", "fp4"])
def test_gradcheck_float64(p, quant, rng):
    packed, state, x, A, B, b = lora_inputs(None, 40, 12, 3, torch.float64, "cpu", rng, lead=(2, 3, 40), **quant)
    seed = seed_of(rng)

    def f(x, A, B, b):
        # the same mask on every evaluation
        return qk.matmul_4bit_lora(x, packed, state, A, B, 0.75, p, b,
                                   generator=torch.Generator().manual_seed(seed))

    # the full Jacobian for the path with everything in it; random projections of it (fast
    # mode) for the others, to keep the CPU run short
    full = p > 0 and not quant
    assert torch.autograd.gradcheck(f, (x, A, B, b), fast_mode=not full)
    assert torch.autograd.gradcheck(lambda x, A, B: f(x, A, B, None), (x, A, B), fast_mode=True)


def check_against_float32(M, K, N, r, dtype, device, p, rng, bias=True, param_dtype=torch.float32):
    """Y, dX, dA, dB (and dbias) against float32 autograd of the dequantized weight."""
    packed, state, x, A, B, b = lora_inputs(M, K, N, r, dtype, device, rng, bias=bias, param_dtype=param_dtype)
    scale = 2.0
    seed = seed_of(rng)
    y = qk.matmul_4bit_lora(x, packed, state, A, B, scale, p, b, generator=torch.Generator().manual_seed(seed))
    assert y.dtype == dtype and y.shape == (M, N)
    dy = randn((M, N), dtype, device, rng)
    y.backward(dy)
    assert A.grad.dtype == param_dtype and B.grad.dtype == param_dtype and x.grad.dtype == dtype

    W = qk.dequantize_4bit(packed, state, dtype=torch.float32)
    # A, B (and the bias) as the op computes with them: rounded to x's dtype. At M = 1 a row of
    # x @ A.T can cancel, and against the float32 masters their rounding alone then exceeded the
    # bound (dB 1.02e-2 at QLORA_KERNELS_TEST_SEED=2626566179); the bound is for the op's arithmetic.
    leaves = [t.detach().to(dtype).float().requires_grad_() for t in (x, A, B)]
    x32, A32, B32 = leaves
    y32 = x32 @ W.T
    if p > 0:
        # the op's mask, from the same seed: dropout of ones is keep / (1 - p)
        op_seed = int(lora.draw_seed(torch.Generator().manual_seed(seed)))
        mask = ops.dropout_forward(torch.ones(M, K, device=device), op_seed, p)
        y32 = y32 + scale * (x32 * mask) @ A32.T @ B32.T
    else:
        y32 = y32 + scale * x32 @ A32.T @ B32.T
    if bias:
        b32 = b.detach().to(dtype).float().requires_grad_()
        leaves.append(b32)
        y32 = y32 + b32
    y32.backward(dy.float())
    errors = {"Y": rel_err(y, y32), "dX": rel_err(x.grad, x32.grad), "dA": rel_err(A.grad, A32.grad),
              "dB": rel_err(B.grad, B32.grad)}
    if bias:
        errors["dbias"] = rel_err(b.grad, b32.grad)
    assert max(errors.values()) < 1e-2, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("M,K,N", [(1, 64, 257), (7, 257, 130), (33, 130, 64)])
def test_gradients_vs_float32_cpu(M, K, N, p, dtype, rng):
    check_against_float32(M, K, N, 8, dtype, "cpu", p, rng)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M", [1, 7, 512, 4096])
@pytest.mark.parametrize("K,N", [(4160, 257), (257, 4160), (4096, 4096)])
def test_gpu_gradients_vs_float32(K, N, M, p, rng):
    check_against_float32(M, K, N, 16, torch.bfloat16, "cuda", p, rng, bias=(N != 4096))


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M,K,N", [(300, 4160, 264), (70, 320, 136), (33, 257, 4160)])
def test_gpu_gradients_through_the_gemm_kernels(M, K, N, p, monkeypatch, rng):
    """The layer with the 4-bit GEMMs forced on small problems (QLORA_KERNELS_GEMM=always): the
    forward in one kernel with LoRA steps (gemm_4bit_lora) and the backward's dX += dY @ W in place
    (gemm_4bit_add_); the last case's K = 257 takes dequantize + cuBLAS in both."""
    monkeypatch.setenv("QLORA_KERNELS_GEMM", "always")
    check_against_float32(M, K, N, 16, torch.bfloat16, "cuda", p, rng, bias=True)


@pytest.mark.gpu
def test_gpu_gradients_fp16_and_bf16_params(rng):
    check_against_float32(512, 4160, 257, 64, torch.float16, "cuda", 0.1, rng, param_dtype=torch.float16)
    check_against_float32(512, 257, 4160, 64, torch.bfloat16, "cuda", 0.1, rng, param_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("QLORA_KERNELS_BACKEND") == "triton", reason="already the Triton run")
def test_gpu_gradients_triton_backend():
    # the backend is chosen at import, so the Triton one runs in a fresh process
    env = {**os.environ, "QLORA_KERNELS_BACKEND": "triton"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                        "-k", "gpu_gradients_vs_float32 or gpu_gradients_fp16 or bit_exact or mask_properties"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# matmul_4bit_lora: dropout, memory, skipped work


def test_p0_is_exactly_the_no_dropout_path(rng, monkeypatch):
    packed, state, x, A, B, b = lora_inputs(9, 96, 40, 8, torch.bfloat16, "cpu", rng)
    W = qk.dequantize_4bit(packed, state, dtype=torch.bfloat16)
    Ab, Bb = A.detach().to(torch.bfloat16), B.detach().to(torch.bfloat16)
    # the same operations without any dropout: the LoRA product with the bias, then the base GEMM added in
    want = torch.addmm(b.detach(), x.detach() @ Ab.T, Bb.T, alpha=0.5).addmm_(x.detach(), W.T)

    def no_kernel(*args):
        raise AssertionError("p == 0 launched a dropout kernel")

    for name in ("dropout_forward", "dropout_backward_add", "dropout_linear", "matmul_dropout", "dropout_grad_weight"):
        monkeypatch.setattr(ops, name, no_kernel)
    rng_state = torch.get_rng_state()
    y = qk.matmul_4bit_lora(x, packed, state, Ab, Bb, 0.5, 0.0, b)
    y.sum().backward()
    assert torch.equal(y, want)
    assert torch.equal(torch.get_rng_state(), rng_state)  # no seed drawn either


def test_dropout_seed_follows_torch_manual_seed(rng):
    packed, state, x, A, B, b = lora_inputs(16, 64, 48, 4, torch.float32, "cpu", rng)
    torch.manual_seed(1234)
    y1 = qk.matmul_4bit_lora(x, packed, state, A, B, 1.0, 0.5, b)
    y2 = qk.matmul_4bit_lora(x, packed, state, A, B, 1.0, 0.5, b)
    torch.manual_seed(1234)
    assert torch.equal(qk.matmul_4bit_lora(x, packed, state, A, B, 1.0, 0.5, b), y1)
    assert not torch.equal(y1, y2)  # a fresh mask per call


@pytest.mark.parametrize("device", DEVICES)
def test_saves_no_weight_and_no_mask(device, rng):
    M, K, N, r = 24, 128, 96, 8
    packed, state, x, A, B, b = lora_inputs(M, K, N, r, torch.float32, device, rng)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = qk.matmul_4bit_lora(x, packed, state, A, B, 1.0, 0.3, b)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    weights = {ptr(t) for t in (packed, state.absmax, state.state2.absmax, state.state2.code, state.offset, A, B)}
    activations = [t for t in saved if t is not None and ptr(t) not in weights]
    shapes = sorted(tuple(t.shape) for t in activations)
    # x, xa [M, r] and the seed: no [N, K] weight, no [M, K] mask or dropped-out x
    assert shapes == sorted([(M, K), (M, r), ()]), shapes
    assert any(ptr(t) == ptr(x) for t in activations)
    y.sum().backward()


def test_dx_skipped_when_x_needs_no_grad(rng, monkeypatch):
    packed, state, x, A, B, b = lora_inputs(8, 64, 32, 4, torch.bfloat16, "cpu", rng)
    calls = []
    real = ops.dequantize_4bit
    monkeypatch.setattr(ops, "dequantize_4bit", lambda *a: calls.append(1) or real(*a))
    x = x.detach()
    y = qk.matmul_4bit_lora(x, packed, state, A, B, 1.0, 0.1, b)
    assert len(calls) == 1
    y.float().sum().backward()
    assert len(calls) == 1  # no dequantize in backward: dX was not computed
    assert A.grad is not None and B.grad is not None and b.grad is not None
    x.requires_grad_()
    qk.matmul_4bit_lora(x, packed, state, A, B, 1.0, 0.1, b).float().sum().backward()
    assert len(calls) == 3 and x.grad is not None


def test_frozen_bias_and_frozen_lora(rng):
    packed, state, x, A, B, b = lora_inputs(8, 64, 32, 4, torch.float32, "cpu", rng)
    b.requires_grad_(False)
    qk.matmul_4bit_lora(x, packed, state, A, B, 1.0, 0.0, b).sum().backward()
    assert b.grad is None and A.grad is not None
    A2, B2 = A.detach(), B.detach()
    x.grad = None
    qk.matmul_4bit_lora(x, packed, state, A2, B2, 1.0, 0.2, b).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_same_gradients(device, rng):
    torch.manual_seed(seed_of(rng) % 2**31)
    layers = nn.ModuleList(LoRALinear4bit.from_linear(nn.Linear(96, 96).to(device), r=8, alpha=16, dropout=0.2)
                           for _ in range(2))
    for layer in layers:
        nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = randn((2, 9, 96), torch.bfloat16, device, rng).requires_grad_()

    def run(checkpoint):
        for t in [x, *layers.parameters()]:
            t.grad = None
        torch.manual_seed(77)
        h = x
        for layer in layers:
            h = torch.utils.checkpoint.checkpoint(layer, h, use_reentrant=False) if checkpoint else layer(h)
            h = torch.nn.functional.gelu(h)
        h.float().pow(2).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in layers.parameters() if p.requires_grad]

    plain, ckpt = run(False), run(True)
    assert len(plain) == 7  # x, and per layer lora_A, lora_B, bias
    for a, c in zip(plain, ckpt):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# Custom-op machinery: opcheck and torch.compile


@pytest.mark.parametrize("device", DEVICES)
def test_lora_ops_opcheck(device, rng):
    packed, state, x, A, B, b = lora_inputs(None, 64, 40, 4, torch.float32, device, rng, lead=(2, 5, 64))
    nested = lora._nested_args(state)
    seed = torch.tensor(seed_of(rng))
    for p, s, bias in ((0.0, None, b), (0.3, seed, None)):
        args = (x, packed, state.absmax, 64, "nf4", 40, *nested, A, B, 0.5, p, s, bias)
        torch.library.opcheck(torch.ops.qlora_kernels.matmul_4bit_lora.default, args)
        _, xa = torch.ops.qlora_kernels.matmul_4bit_lora(*args)
        dY = randn((2, 5, 40), torch.float32, device, rng)
        for need in ((True, True, True), (False, True, True), (True, False, False)):
            torch.library.opcheck(torch.ops.qlora_kernels.matmul_4bit_lora_backward.default,
                                  (dY, x.detach(), packed, state.absmax, 64, "nf4", 40, *nested,
                                   A.detach(), B.detach(), xa, 0.5, p, s, *need))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_eager_function_equals_custom_op(device, p, rng):
    # eager mode runs _EagerLoRA (less dispatch overhead), torch.compile the custom ops: the two
    # must compute the same Y and gradients, bit for bit (same implementation functions)
    packed, state, x, A, B, b = lora_inputs(None, 96, 72, 8, torch.bfloat16, device, rng, lead=(3, 11, 96))
    dY = randn((3, 11, 72), torch.bfloat16, device, rng)
    nested = lora._nested_args(state)
    seed = torch.tensor(seed_of(rng)) if p else None
    meta = (64, "nf4", 72, nested[3], 0.5, p)
    leaves = [t.detach().clone().requires_grad_() for t in (x, A, B, b)]
    Y_fn = lora._EagerLoRA.apply(*leaves, packed, state.absmax, *nested[:3], seed, meta)
    Y_fn.backward(dY)
    leaves_op = [t.detach().clone().requires_grad_() for t in (x, A, B, b)]
    xo, Ao, Bo, bo = leaves_op
    Y_op, _ = torch.ops.qlora_kernels.matmul_4bit_lora(xo, packed, state.absmax, 64, "nf4", 72, *nested,
                                                        Ao, Bo, 0.5, p, seed, bo)
    Y_op.backward(dY)
    assert torch.equal(Y_fn, Y_op)
    for got, want in zip(leaves, leaves_op):
        assert torch.equal(got.grad, want.grad)
    assert x.grad is None  # sanity: the clones, not the originals, got gradients


def compile_backend(device):
    # inductor on CPU needs a C++ compiler; without one, aot_eager still runs the fake kernels,
    # the autograd registration and the functionalized graph
    if device == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
        return "aot_eager"
    return "inductor"


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step(device, rng):
    torch.manual_seed(seed_of(rng) % 2**31)
    model = nn.Sequential(LoRALinear4bit.from_linear(nn.Linear(64, 128), r=8, dropout=0.1),
                          nn.GELU(),
                          LoRALinear4bit.from_linear(nn.Linear(128, 64, bias=False), r=8, dropout=0.1)).to(device)
    for m in (model[0], model[2]):
        nn.init.normal_(m.lora_B.weight, std=0.1)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    x = randn((4, 7, 64), torch.bfloat16, device, rng)
    target = randn((4, 7, 64), torch.bfloat16, device, rng)

    def step(x, target):
        return torch.nn.functional.mse_loss(model(x).float(), target.float())

    def grads_of(fn, seed):
        torch.manual_seed(seed)
        for p in params:
            p.grad = None
        loss = fn(x, target)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    compiled = torch.compile(step, fullgraph=True, backend=compile_backend(device))
    loss_c, grads_c = grads_of(compiled, 5)
    loss_c2, grads_c2 = grads_of(compiled, 5)
    assert torch.equal(loss_c, loss_c2)  # reproducible under torch.manual_seed
    if device == "cpu":
        # the seed is drawn from the CPU generator eager uses (inductor keeps the CPU randint's
        # stream): identical masks, so the same loss and gradients
        loss_e, grads_e = grads_of(step, 5)
        assert torch.allclose(loss_c, loss_e, rtol=1e-3)
        for gc, ge in zip(grads_c, grads_e):
            assert rel_err(gc, ge) < 1e-2
    model.eval()  # p = 0: the compiled graph must agree with eager
    loss_e, grads_e = grads_of(step, 5)
    loss_c, grads_c = grads_of(torch.compile(step, fullgraph=True, backend=compile_backend(device)), 5)
    assert torch.allclose(loss_c, loss_e, rtol=1e-3)
    for gc, ge in zip(grads_c, grads_e):
        assert rel_err(gc, ge) < 1e-2


# ---------------------------------------------------------------------------------------------
# Modules: LoRALinear4bit, add_lora


def quantize_linears(model):
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Linear4bit.from_linear(module))
    return model


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)


def test_add_lora_on_a_small_model(rng):
    torch.manual_seed(seed_of(rng) % 2**31)
    model = quantize_linears(tiny_llama())
    lm_head_before = {k: v.clone() for k, v in model.lm_head.state_dict().items()}
    out = qk.add_lora(model, r=4, alpha=8, dropout=0.1)
    assert out is model
    lora_layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear4bit)}
    assert len(lora_layers) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert type(model.lm_head) is Linear4bit  # never wrapped by all-linear
    assert all(torch.equal(v, model.lm_head.state_dict()[k]) for k, v in lm_head_before.items())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(lora_layers)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32 and layer.lora_B.weight.shape == (64, 4)
    assert layer.scaling == 2.0 and layer.lora_dropout == 0.1 and layer.r == 4
    assert not layer.lora_B.weight.any()  # peft init: B = 0, so the model is unchanged at first

    ids = torch.randint(0, 96, (2, 11), generator=rng)
    # the hidden states, not the loss: Linear4bit (the lm_head here) has no backward yet
    model.model(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad.any() for n, p in model.named_parameters() if ".lora_B." in n)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)

    # a target list wraps only the named layers
    model2 = qk.add_lora(quantize_linears(tiny_llama()), r=4, target=["q_proj", "v_proj"])
    names = sorted(n.split(".")[-1] for n, m in model2.named_modules() if isinstance(m, LoRALinear4bit))
    assert names == ["q_proj", "q_proj", "v_proj", "v_proj"]


def test_lora_layer_merge_matches_module(rng):
    torch.manual_seed(seed_of(rng) % 2**31)
    layer = LoRALinear4bit.from_linear(nn.Linear(130, 72), r=8, alpha=16, dropout=0.1)
    nn.init.normal_(layer.lora_B.weight, std=0.05)
    x = randn((5, 130), torch.float32, "cpu", rng)
    layer.eval()
    y = layer(x)
    merged = layer.merge()
    assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.bfloat16
    assert rel_err(merged(x.to(torch.bfloat16)), y) < 1e-2
    W = layer.dequantize(torch.float32) + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    assert torch.allclose(merged.weight.float(), W, rtol=2**-8, atol=1e-6)
    # train mode applies dropout to the LoRA branch only
    layer.train()
    assert not torch.equal(layer(x), y)


def test_lora_layer_state_dict_round_trip(rng):
    layer = LoRALinear4bit.from_linear(nn.Linear(64, 48), r=4)
    nn.init.normal_(layer.lora_B.weight)
    sd = layer.state_dict()
    assert {"weight", "bias", "lora_A.weight", "lora_B.weight", "weight.absmax"} <= set(sd)
    fresh = LoRALinear4bit(64, 48, r=4, weight_dtype=torch.float32)
    fresh.load_state_dict(sd)
    x = randn((3, 64), torch.float32, "cpu", rng)
    layer.eval(), fresh.eval()
    assert torch.equal(fresh(x), layer(x))


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_names_the_argument(rng):
    packed, state, x, A, B, b = lora_inputs(4, 64, 32, 4, torch.float32, "cpu", rng)
    f = qk.matmul_4bit_lora
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 64\]"):
        f(x[:, :63], packed, state, A, B, 1.0)
    with pytest.raises(ValueError, match="x: expected dtype"):
        f(x.int(), packed, state, A, B, 1.0)
    with pytest.raises(ValueError, match=r"A: expected shape \[r, 64\], got \[4, 63\]"):
        f(x, packed, state, A[:, :63], B, 1.0)
    with pytest.raises(ValueError, match=r"B: expected shape \[32, 4\], got \[32, 3\]"):
        f(x, packed, state, A, B[:, :3], 1.0)
    with pytest.raises(TypeError, match="A: expected a torch.Tensor"):
        f(x, packed, state, None, B, 1.0)
    with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\), got 1.0"):
        f(x, packed, state, A, B, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="dropout_p: expected a probability"):
        f(x, packed, state, A, B, 1.0, dropout_p=-0.1)
    with pytest.raises(TypeError, match="scale: expected a float"):
        f(x, packed, state, A, B, "2")
    with pytest.raises(ValueError, match=r"bias: expected shape \[32\], got \[31\]"):
        f(x, packed, state, A, B, 1.0, 0.0, b[:31])
    with pytest.raises(TypeError, match="state: expected a qlora_kernels.QuantState"):
        f(x, packed, None, A, B, 1.0)
    with pytest.raises(ValueError, match="r: expected a positive int, got 0"):
        LoRALinear4bit(64, 32, r=0)
    with pytest.raises(ValueError, match="dropout: expected a probability"):
        LoRALinear4bit.from_linear(nn.Linear(64, 32), dropout=1.5)
    with pytest.raises(TypeError, match="layer: expected a qlora_kernels.nn.Linear4bit"):
        LoRALinear4bit.from_linear4bit(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="target: model has no 4-bit linear layers"):
        qk.add_lora(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(ValueError, match="target: expected \"all-linear\" or"):
        qk.add_lora(nn.Sequential(Linear4bit(64, 64)), target="everything")
    with pytest.raises(ValueError, match=r"target: model has no Linear4bit layers named like \['k_proj'\]"):
        qk.add_lora(nn.Sequential(Linear4bit(64, 64)), target=["k_proj"])


@pytest.mark.gpu
def test_gpu_mixed_devices_rejected(rng):
    packed, state, x, A, B, b = lora_inputs(4, 64, 32, 4, torch.bfloat16, "cuda", rng)
    with pytest.raises(ValueError, match="A: expected a tensor on cuda"):
        qk.matmul_4bit_lora(x, packed, state, A.cpu(), B, 1.0)
    with pytest.raises(ValueError, match="x: float64 is supported on CPU only"):
        qk.matmul_4bit_lora(x.double(), packed, state, A, B, 1.0)
