"""Optimizer step time for the LoRA parameters of a 7B LLaMA (r=64 on all seven linear layers
of 32 layers: 32 x (4 x (4096*64*2) + 3 x (4096+11008)*64) = 160M params):

    python benchmarks/bench_optim.py [--dtype float32|bfloat16] [--layers 32] [--json out.json]

Rows: torch.optim.AdamW(fused=True); PagedAdamW with all state on the device (grads already
in its flat buffer, as after zero_grad(set_to_none=False); and grads re-allocated by each
backward, as after zero_grad(), which costs a copy into that buffer); PagedAdamW with all
state paged to pinned host memory. Each row: median ms per step, the device bytes a step must
read + write (param, grad, two moments) over that time, and where the state lives.
"""

from __future__ import annotations

import argparse

import torch

import common


def lora_shapes(layers: int, hidden: int = 4096, inter: int = 11008, r: int = 64):
    shapes = []
    for _ in range(layers):
        for _ in range(4):  # q, k, v, o: A [r, hidden], B [hidden, r]
            shapes += [(r, hidden), (hidden, r)]
        shapes += [(r, hidden), (inter, r)] * 2  # gate, up
        shapes += [(r, inter), (hidden, r)]  # down
    return shapes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="LoRA param dtype")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", default=None, help="default benchmarks/results/<gpu>/optim.json")
    args = ap.parse_args()
    import qlora_kernels as qk
    from qlora_kernels.optim import PagedAdamW

    dtype = getattr(torch, args.dtype)
    shapes = lora_shapes(args.layers)
    n = sum(r * c for r, c in shapes)
    g = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g).to(dtype) * 0.01) for s in shapes]
    grads = [torch.randn(s, device="cuda", generator=g).to(dtype) * 1e-3 for s in shapes]
    esize = torch.empty((), dtype=dtype).element_size()
    step_bytes = n * (3 * esize + 16)  # param read + write, grad read, two moments read + write
    env = common.environment()
    print(f"{len(shapes)} tensors, {n / 1e6:.1f}M params ({args.dtype}), backend {qk.backend()}, {env['gpu']}")
    print(f"{'case':44s} {'ms/step':>9s} {'GB/s':>7s} {'state on device':>16s} {'on host':>9s}")
    rows = []

    def run(name, make_opt, regrad):
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt = make_opt([p for p in params])
        opt.step()  # the state is created at the first step

        def step():
            if regrad:  # a fresh grad tensor per param, as backward makes after zero_grad()
                for p, gr in zip(params, grads):
                    p.grad = gr
            opt.step()

        ms = common.bench(lambda _: step(), [None])
        placed = opt.state_bytes() if hasattr(opt, "state_bytes") else {"device": 8 * n, "host": 0}
        row = {"case": name, "ms": ms, "gbs": step_bytes / ms / 1e6, "params": n, "tensors": len(shapes),
               "dtype": args.dtype, "state_device_bytes": placed["device"], "state_host_bytes": placed["host"]}
        rows.append(row)
        print(f"{name:44s} {ms:9.3f} {row['gbs']:7.0f} {placed['device'] / 2**30:13.2f} GiB "
              f"{placed['host'] / 2**30:5.2f} GiB", flush=True)
        del opt
        torch.cuda.empty_cache()

    run("torch.optim.AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, lr=2e-4, weight_decay=0.0, fused=True),
        regrad=False)
    run("PagedAdamW paged=False, grads in flat buffer", lambda ps: PagedAdamW(ps, paged=False), regrad=False)
    run("PagedAdamW paged=False, grads re-allocated", lambda ps: PagedAdamW(ps, paged=False), regrad=True)
    run("PagedAdamW paged=True (all state on host)", lambda ps: PagedAdamW(ps, paged=True), regrad=False)
    path = common.save({"env": env, "rows": rows}, "optim", args.json)
    print("saved", path)


if __name__ == "__main__":
    main()
