"""Runs every CUDA path of the dropout kernels once on small, awkward inputs, for
compute-sanitizer:

    compute-sanitizer --tool memcheck  python tools/sanitize_dropout.py
    compute-sanitizer --tool racecheck python tools/sanitize_dropout.py
    compute-sanitizer --tool memcheck  python tools/sanitize_dropout.py triton   (the Triton kernels)

Checks nothing itself (tests/test_lora.py does); it only has to touch every code path: every
dtype, sizes around the 4- and 8-element vectors, 16-byte aligned and unaligned views (the
vector and the element-by-element paths), seeds by value and in device memory, the fused
dropout matmuls (dropout_linear, matmul_dropout, dropout_grad_weight) at every r tile and with
tails in M, K and r (dropout_grad_weight also split over the tokens: M = 1100, and r not a
multiple of 8: g's element-by-element path), and one training step of matmul_4bit_lora.
"""

import sys

import torch

import qlora_kernels as qk

if sys.argv[1:] == ["triton"]:
    from qlora_kernels.triton import dropout as ops
else:
    assert qk.backend() == "cuda", f"the CUDA extension is not loaded (backend {qk.backend()})"
    ops = torch.ops.qlora_kernels
g = torch.Generator(device="cuda").manual_seed(0)
for n in (1, 3, 4, 5, 7, 8, 9, 15, 17, 1000, 4099, 65543):
    print("n =", n, flush=True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        base = torch.randn(n + 3, device="cuda", generator=g).to(dtype)
        for x in (base[:n], base[1 : n + 1], base[3:]):  # aligned, and 1 or 3 elements past it
            for p in (0.0, 0.1, 0.9):
                y = ops.dropout_forward(x, 12345 + n, p)
                out = torch.randn(n + 1, device="cuda", generator=g).to(dtype)
                ops.dropout_backward_add(out[1:], y, 12345 + n, p)  # unaligned out
                ops.dropout_backward_add(out[:n], x, -7, p)
                # the seed read from device memory (CUDA graphs)
                held = torch.tensor([n - 5], dtype=torch.int64, device="cuda")
                ops.dropout_backward_add(out[1:], ops.dropout_forward(x, 0, p, held), 0, p, held)
for M, K, r in ((1, 8, 1), (7, 264, 16), (33, 520, 40), (130, 4160, 64), (300, 1032, 5), (1100, 64, 24)):
    print("M, K, r =", (M, K, r), flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
        w = torch.randn(r, K, device="cuda", generator=g).to(dtype)
        a = torch.randn(M, r, device="cuda", generator=g).to(dtype)
        held = torch.tensor([M * K], dtype=torch.int64, device="cuda")
        ops.dropout_linear(x, w, 99, 0.1)
        ops.dropout_linear(x, w, 0, 0.1, held)
        ops.matmul_dropout(a, w, 99, 0.1)
        ops.matmul_dropout(a, w, 0, 0.1, held)
        ops.dropout_grad_weight(a, x, 99, 0.1)
        ops.dropout_grad_weight(a, x, 0, 0.1, held)
if sys.argv[1:] != ["triton"]:
    W = torch.randn(257, 4160, device="cuda") * 0.02
    packed, state = qk.quantize_4bit(W)
    x = torch.randn(7, 4160, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(16, 4160, device="cuda", requires_grad=True)
    B = torch.randn(257, 16, device="cuda", requires_grad=True)
    qk.matmul_4bit_lora(x, packed, state, A, B, 2.0, 0.1).float().sum().backward()
torch.cuda.synchronize()
print("sanitize_dropout: all kernels ran")
