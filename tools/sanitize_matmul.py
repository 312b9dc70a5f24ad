"""Runs every path of the CUDA fused 4-bit matmul once on small, awkward inputs, for
compute-sanitizer:

    compute-sanitizer --tool memcheck  python tools/sanitize_matmul.py
    compute-sanitizer --tool racecheck python tools/sanitize_matmul.py
    compute-sanitizer --tool memcheck  python tools/sanitize_matmul.py triton   (the Triton kernels)

Checks nothing itself (tests/test_matmul_4bit.py does); it only has to touch every code path:
each n-tile count (M = 1, 9, 17, 33 and 65, which also takes a second token tile), N not a
multiple of 16, K not a multiple of the 128-element warp step, bf16 and fp16, NF4 and FP4,
plain and double-quantized absmax, with and without bias. On sm_90 M = 1 and 3 take the
bulk-copy kernel; they run again with it turned off, and once with more row tiles than its
persistent grid has CTAs, alone and grouped. On sm_90 9-64 tokens take the rows kernel; each of
its configurations runs, and the register kernel in its place. Then gemm_4bit, the many-token
op (on sm_90 its wgmma kernel, with both token tiles), gemm_4bit_dx, gemm_4bit_add_ and
gemm_4bit_lora (the kernel's LoRA steps).
"""

import itertools
import os
import sys

import torch

import qlora_kernels as qk
from qlora_kernels.matmul import _nested_args, matmul_4bit_group

TRITON = sys.argv[1:] == ["triton"]
if TRITON:
    # The same shapes through the Triton kernels: M = 1 the matvec kernel, the rest the dot one
    # (M = 65 a second token tile), with and without K splits.
    from qlora_kernels.triton.matmul import matmul_4bit as op
else:
    assert qk.backend() == "cuda", f"the CUDA extension is not loaded (backend {qk.backend()})"
    op = torch.ops.qlora_kernels.matmul_4bit
g = torch.Generator(device="cuda").manual_seed(0)
for N, K in ((7, 32), (33, 160), (257, 4160)):
    print(f"N={N} K={K}", flush=True)
    W = torch.randn(N, K, device="cuda", generator=g)
    for qt in ("nf4", "fp4"):
        for bs, dq in ((32, False), (64, True), (4096, True)):
            packed, st = qk.quantize_4bit(W, quant_type=qt, blocksize=bs, double_quant=dq)
            for dtype in (torch.bfloat16, torch.float16):
                bias = torch.randn(N, device="cuda", generator=g).to(dtype)
                for M in (1, 3, 9, 17, 33, 65):
                    x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
                    op(x, packed, st.absmax, bs, qt, N, *_nested_args(st), bias)
                    op(x, packed, st.absmax, bs, qt, N, *_nested_args(st), None)
if TRITON:
    torch.cuda.synchronize()
    print("sanitize_matmul triton: all paths ran")
    sys.exit(0)
# the register kernel at 1-8 tokens, where sm_90 takes the bulk-copy kernel
os.environ["QLORA_KERNELS_MM_BULK"] = "0"
W = torch.randn(257, 4160, device="cuda", generator=g)
packed, st = qk.quantize_4bit(W, quant_type="nf4", blocksize=64, double_quant=True)
for M in (1, 8):
    x = torch.randn(M, 4160, device="cuda", generator=g).to(torch.bfloat16)
    op(x, packed, st.absmax, 64, "nf4", 257, *_nested_args(st), None)
del os.environ["QLORA_KERNELS_MM_BULK"]
# more row tiles (513, and 537 grouped) than the persistent grid has CTAs (on an H100 513 take
# the 4-CTA build at one token, 537 the default one); K = 1056: a last stage of 32 elements
print("persistent grid", flush=True)
weights = [qk.quantize_4bit(torch.randn(N, 1056, device="cuda", generator=g), "nf4", 64, double_quant=True)
           for N in (8200, 257, 96, 24)]
for M in (1, 5):
    x = torch.randn(M, 1056, device="cuda", generator=g).to(torch.bfloat16)
    qk.matmul_4bit(x, *weights[0])
    matmul_4bit_group(x, weights, [None] * len(weights))
# sm_90, 9-64 tokens: every configuration of the rows kernel (the default ran above), then the
# register kernel in its place
print("rows kernel", flush=True)
W = torch.randn(257, 4160, device="cuda", generator=g)
packed, st = qk.quantize_4bit(W, quant_type="nf4", blocksize=64, double_quant=True)
for rows in ("1,2", "1,4", "2,2", "2,4", "1,4,3", "2,2,1000", "0"):
    os.environ["QLORA_KERNELS_MM_ROWS"] = rows
    for M in (1, 5, 9, 17, 33):
        x = torch.randn(M, 4160, device="cuda", generator=g).to(torch.bfloat16)
        op(x, packed, st.absmax, 64, "nf4", 257, *_nested_args(st), None)
del os.environ["QLORA_KERNELS_MM_ROWS"]
# gemm_4bit (many tokens): on sm_90 the wgmma kernel, on these small problems too; two token
# tiles (300), a last row tile of 1 row (257: the element-wise epilogue) and of 8 (264: the
# 16-byte one), 65 K steps, with and without bias and accumulate, both dtypes and formats
print("gemm_4bit", flush=True)
os.environ["QLORA_KERNELS_GEMM"] = "always"
for (N, qt, bs, dq), tile in itertools.product(((257, "nf4", 64, True), (264, "fp4", 128, False)), ("256", "128")):
    os.environ["QLORA_KERNELS_GEMM_TILE"] = tile  # both token tiles of the kernel
    W = torch.randn(N, 4160, device="cuda", generator=g)
    packed, st = qk.quantize_4bit(W, quant_type=qt, blocksize=bs, double_quant=dq)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(300, 4160, device="cuda", generator=g).to(dtype)
        bias = torch.randn(N, device="cuda", generator=g).to(dtype)
        acc = torch.randn(300, N, device="cuda", generator=g).to(dtype)
        torch.ops.qlora_kernels.gemm_4bit(x, packed, st.absmax, bs, qt, N, *_nested_args(st), bias, acc)
        torch.ops.qlora_kernels.gemm_4bit(x, packed, st.absmax, bs, qt, N, *_nested_args(st), None, None)
        # x @ W (gemm_4bit_dx): the reduction over N's 257 / 264 rows (a partial last step), the
        # 4160 columns in 33 tiles of 128 (a partial last one)
        dy = torch.randn(300, N, device="cuda", generator=g).to(dtype)
        acc_dx = torch.randn(300, 4160, device="cuda", generator=g).to(dtype)
        # (N = 257 takes the dequantize path: the kernel's x rows must start on 16 bytes)
        torch.ops.qlora_kernels.gemm_4bit_dx(dy, packed, st.absmax, bs, qt, N, 4160, *_nested_args(st))
        # in place (gemm_4bit_add_, as the LoRA layer calls it), both orientations
        torch.ops.qlora_kernels.gemm_4bit_add_(acc_dx, dy, packed, st.absmax, bs, qt, N, 4160, *_nested_args(st),
                                               True)
        torch.ops.qlora_kernels.gemm_4bit_add_(acc, x, packed, st.absmax, bs, qt, N, 4160, *_nested_args(st), False)
        # with the LoRA term as extra steps (gemm_4bit_lora): r 16 (one step, columns past r read
        # as zeros from xa and not loaded from B) and 72 (two steps, the second 8 wide)
        for r in (16, 72):
            xa = torch.randn(300, r, device="cuda", generator=g).to(dtype)
            B = torch.randn(N, r, device="cuda", generator=g).to(dtype)
            torch.ops.qlora_kernels.gemm_4bit_lora(x, packed, st.absmax, bs, qt, N, *_nested_args(st), xa, B, 0.5,
                                                   bias)
del os.environ["QLORA_KERNELS_GEMM"], os.environ["QLORA_KERNELS_GEMM_TILE"]
torch.cuda.synchronize()
print("sanitize_matmul: all paths ran")
