"""Runs every CUDA path of adamw_step once on small, awkward inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python tools/sanitize_adamw.py
    compute-sanitizer --tool racecheck python tools/sanitize_adamw.py
    compute-sanitizer --tool memcheck  python tools/sanitize_adamw.py triton   (the Triton kernel)

Checks nothing itself (tests/test_optim.py does); it only has to touch every code path: each
param x grad dtype, the 16-byte vector path and its element-wise tail, views off their 16-byte
boundary (the element-wise kernel), and PagedAdamW's paging (staging slots, side streams).
"""

import sys

import torch

import qlora_kernels as qk
from qlora_kernels.optim import PagedAdamW

if sys.argv[1:] == ["triton"]:
    from qlora_kernels.triton.adamw import adamw_step
else:
    assert qk.backend() == "cuda", f"the CUDA extension is not loaded (backend {qk.backend()})"
    adamw_step = torch.ops.qlora_kernels.adamw_step.default
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
g = torch.Generator(device="cuda").manual_seed(0)
for n in (1, 7, 8, 9, 1000, 4097, 70001):
    print("n =", n, flush=True)
    for pdtype in DTYPES:
        for gdtype in DTYPES:
            for offset in (0, 1, 4):  # aligned; off the vector boundary; 16-byte aligned fp32 only
                param = torch.randn(n + offset, device="cuda", generator=g).to(pdtype)[offset:]
                grad = torch.randn(n + offset, device="cuda", generator=g).to(gdtype)[offset:]
                m = torch.randn(n + offset, device="cuda", generator=g)[offset:]
                v = torch.rand(n + offset, device="cuda", generator=g)[offset:]
                adamw_step(param, grad, m, v, 1e-3, 0.9, 0.999, 1e-8, 0.01, 0.271, 0.002997)
if sys.argv[1:] != ["triton"]:
    # paging: a budget that holds part of the state, pages of 1000 elements through two slots
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g))
              for s in [(33, 70), (70, 33), (4097,), (1,)]]
    for kw in (dict(paged=True), dict(paged="auto", device_budget_bytes=40_000)):
        opt = PagedAdamW(params, weight_decay=0.01, page_bytes=8000, **kw)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=g)
            opt.step()
        opt.state_dict()
torch.cuda.synchronize()
print("sanitize_adamw: all paths ran")
