"""The QLoRA layer for training, forward + backward: ``qlora_kernels.matmul_4bit_lora`` against
(a) a bf16 base weight + the same LoRA in plain PyTorch (nn.Dropout, F.linear, the LoRA
matmuls) and (b) bitsandbytes' ``matmul_4bit`` + the same LoRA (when importable), same run.

    python benchmarks/bench_matmul_lora.py            # 7B and 65B shapes, 512..8192 tokens (< 4 min on an H100)
    python benchmarks/bench_matmul_lora.py --quick    # 7B shapes at 4096 tokens

Each row: shape (N, K), tokens M, r, dropout p; time of forward + backward (x, A and B need
gradients, W is frozen) per implementation, replayed from a CUDA graph (the GPU's time, as in a
training step whose CPU runs ahead; the eager times, launch overhead included, are printed too); TFLOP/s counting the base GEMMs (forward 2MNK,
backward dX 2MNK) plus the LoRA's 6Mr(K + N); % of the measured bf16 GEMM rate (an 8192^3
matmul in the same run); speedups; and the activation memory each one saves for backward
(torch.autograd.graph.saved_tensors_hooks, bytes of distinct storages, the base weight, its
quant state and the LoRA parameters excluded: weights, not activations). Saves JSON under benchmarks/results/<gpu>/matmul_lora.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import qlora_kernels as qk  # noqa: E402

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
SHAPES_65B = [(8192, 8192), (22016, 8192), (8192, 22016)]


def bnb_module():
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001  (a broken install must not stop the benchmark)
        return None
    return bnb


def gemm_rate_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = common.bench(lambda _: a @ b, [None])
    return 2 * 8192**3 / ms / 1e9


def saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages fn's forward saves for backward, minus `exclude`'s."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in excluded:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def run_case(N, K, M, r, p, weights, bnb, x, dy):
    """Times of forward + backward (ms) and saved activation bytes, per implementation."""
    A = (torch.randn(r, K, device="cuda") / K**0.5).requires_grad_()
    B = (torch.randn(N, r, device="cuda") * 0.01).requires_grad_()
    scale = 16 / r
    params = [x, A, B]

    def clear():
        for t in params:
            t.grad = None

    def ours(w):
        packed, state = w["ours"]
        return qk.matmul_4bit_lora(x, packed, state, A, B, scale, p)

    dropout = torch.nn.Dropout(p)

    def lora(inp):
        return F.linear(F.linear(dropout(inp), A.to(inp.dtype)), B.to(inp.dtype)) * scale

    def bf16(w):
        return F.linear(x, w["bf16"]) + lora(x)

    def bnb_layer(w):
        packed, state = w["bnb"]
        return bnb.matmul_4bit(x, packed.t(), quant_state=state) + lora(x)

    impls = {"ours": ours, "bf16": bf16}
    if bnb is not None:
        impls["bnb"] = bnb_layer
    times, eager, mem = {}, {}, {}
    for name, fwd in impls.items():
        def step(w, fwd=fwd):
            clear()
            fwd(w).backward(dy)

        times[name], eager[name] = common.bench_gpu_and_eager(name, step, weights)
        w0 = weights[0]
        packed, state = w0["ours"]
        # weights are not activations: the frozen base in any form, and the LoRA parameters
        # themselves (a copy made from them, such as a bf16 cast, still counts)
        exclude = [w0["bf16"], packed, state.absmax, state.state2.absmax, state.state2.code, state.offset, A, B]
        if bnb is not None:
            exclude += [w0["bnb"][0], w0["bnb"][1].absmax]
        mem[name] = saved_bytes(lambda: fwd(w0), exclude)
    clear()
    return times, eager, mem


def make_weights(N, K, bnb, copies):
    out = []
    for _ in range(copies):
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        w = {"bf16": W, "ours": qk.quantize_4bit(W, "nf4", 64, double_quant=True, check_finite=False)}
        if bnb is not None:
            w["bnb"] = bnb.functional.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        out.append(w)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="7B shapes at 4096 tokens, r=16")
    ap.add_argument("--tokens", type=int, nargs="*", default=None)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<gpu>/matmul_lora.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_matmul_lora: needs a CUDA GPU")
    shapes = SHAPES_7B if args.quick else SHAPES_7B + SHAPES_65B
    tokens = args.tokens or ([4096] if args.quick else [512, 2048, 4096, 8192])
    ranks = [16] if args.quick else [16, 64]
    bnb = bnb_module()
    env = common.environment()
    peak = gemm_rate_tflops()
    print(f"# {env['gpu']}, torch {env['torch']}, backend {qk.backend()}, bitsandbytes "
          f"{env.get('bitsandbytes', 'not importable')}; bf16 GEMM 8192^3: {peak:.0f} TFLOP/s", flush=True)
    header = (f"{'N x K':>13} {'M':>5} {'r':>3} {'p':>4} | {'ours ms':>8} {'TFLOP/s':>7} {'%gemm':>5} | "
              f"{'bf16 ms':>8} {'ours/bf16':>9} | {'bnb ms':>8} {'bnb/ours':>8} | "
              f"{'saved MiB ours/bf16/bnb':>24} | {'eager ours/bf16/bnb ms':>22}")
    print(header)
    rows = []
    for N, K in shapes:
        # 4-bit weights are a quarter of bf16's: rotate copies so no call finds W in L2
        weights = make_weights(N, K, bnb, min(8, common.copies_for(N * K // 2)))
        for M in tokens:
            x = (torch.randn(M, K, device="cuda", dtype=torch.bfloat16)).requires_grad_()
            dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            for r in ranks:
                for p in (0.1, 0.0):
                    times, eager, mem = run_case(N, K, M, r, p, weights, bnb, x, dy)
                    flops = 4 * M * N * K + 6 * M * r * (K + N)
                    tf = flops / times["ours"] / 1e9
                    row = {"N": N, "K": K, "M": M, "r": r, "p": p, "ms": times, "eager_ms": eager,
                           "saved_bytes": mem,
                           "tflops": tf, "pct_of_gemm": 100 * tf / peak,
                           "ours_over_bf16": times["ours"] / times["bf16"],
                           "eager_ours_over_bf16": eager["ours"] / eager["bf16"]}
                    bnb_ms = times.get("bnb")
                    if bnb_ms is not None:
                        row["bnb_over_ours"] = bnb_ms / times["ours"]
                    rows.append(row)
                    mib = "/".join(f"{mem[k] / 2**20:.0f}" for k in ("ours", "bf16", "bnb") if k in mem)
                    print(f"{N:>6}x{K:<6} {M:>5} {r:>3} {p:>4} | {times['ours']:8.3f} {tf:7.0f} "
                          f"{100 * tf / peak:5.1f} | {times['bf16']:8.3f} {row['ours_over_bf16']:9.3f} | "
                          f"{bnb_ms if bnb_ms is not None else float('nan'):8.3f} "
                          f"{row.get('bnb_over_ours', float('nan')):8.3f} | {mib:>24} | "
                          f"{'/'.join(f'{eager[k]:.3f}' for k in eager):>22}", flush=True)
            del x, dy
        del weights
        torch.cuda.empty_cache()
    path = common.save({"env": env, "bf16_gemm_tflops": peak, "rows": rows}, "matmul_lora", args.out)
    print(f"# saved {path}")


if __name__ == "__main__":
    main()
