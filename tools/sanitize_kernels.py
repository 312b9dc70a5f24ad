"""Runs every CUDA kernel once on small, awkward inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python tools/sanitize_kernels.py
    compute-sanitizer --tool racecheck python tools/sanitize_kernels.py
    compute-sanitizer --tool memcheck  python tools/sanitize_kernels.py triton   (the Triton kernels)

Checks nothing itself (the tests do); it only has to touch every code path: all blocksizes,
dtypes, quant types, odd sizes, unaligned pointers, nested and plain absmax.
"""

import sys

import torch

import qlora_kernels as qk
from qlora_kernels import codes

if sys.argv[1:] == ["triton"]:
    from qlora_kernels.triton import quant as ops
else:
    assert qk.backend() == "cuda", f"the CUDA extension is not loaded (backend {qk.backend()})"
    ops = torch.ops.qlora_kernels
code8 = codes.dynamic_map("cuda")
g = torch.Generator(device="cuda").manual_seed(0)
for n in (1, 7, 63, 65, 1000, 4099):
    print("n =", n, flush=True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        base = torch.randn(n + 1, device="cuda", generator=g).to(dtype)
        for A in (base[:n], base[1:]):  # aligned, and 1 element past alignment
            for bs in codes.BLOCKSIZES:
                for qt in ("nf4", "fp4"):
                    packed, absmax = ops.quantize_4bit(A, bs, qt)
                    offset = absmax.mean()
                    q, nabs = ops.quantize_8bit(absmax, offset, code8, 256)
                    ops.dequantize_8bit(q, nabs, code8, offset, 256)
                    for view in (packed, packed.reshape(-1)[1:]):
                        m = 2 * view.numel() if view.data_ptr() != packed.data_ptr() else n
                        nb = -(-m // bs)
                        ops.dequantize_4bit(view, absmax[:nb] if nb <= absmax.numel() else
                                            torch.ones(nb, device="cuda"), bs, qt, m, dtype)
                        if 0 < nb <= q.numel() and -(-nb // 256) == nabs.numel():
                            ops.dequantize_4bit(view, q[:nb], bs, qt, m, dtype, nabs, code8, offset, 256)
torch.cuda.synchronize()
print("sanitize_kernels: all kernels ran")
