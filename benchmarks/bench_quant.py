"""Quantize and dequantize throughput (NF4, with and without double quant) against the
device's copy bandwidth and bitsandbytes, for LLaMA weight shapes in bf16.

    python benchmarks/bench_quant.py [--json out.json] [--shapes 4096x4096,...]

One row per case: time, GB/s of bytes read + written, % of the copy rate measured in the
same run, and the speedup over bitsandbytes when it is importable. Both our backends run
when they can (the CUDA extension and Triton).
"""

from __future__ import annotations

import argparse

import torch

import common

DEFAULT_SHAPES = "4096x4096,8192x8192,28672x8192"


def implementations():
    import qlora_kernels as qk
    from qlora_kernels import codes

    impls = {}
    if qk.backend() == "cuda":
        impls["cuda"] = torch.ops.qlora_kernels
    try:
        from qlora_kernels.triton import quant as tq

        impls["triton"] = tq
    except ImportError:
        pass

    def call(ops, name, *args):
        fn = getattr(ops, name)
        return fn.default(*args) if hasattr(fn, "default") else fn(*args)

    def quantizer(ops, double_quant):
        code8 = codes.dynamic_map("cuda")

        def run(W):
            packed, absmax = call(ops, "quantize_4bit", W, 64, "nf4")
            if double_quant:
                offset = absmax.mean()
                call(ops, "quantize_8bit", absmax, offset, code8, 256)
            return packed

        return run

    def dequantizer(ops):
        def run(item):
            packed, state = item
            if state.nested:
                return call(ops, "dequantize_4bit", packed, state.absmax, 64, "nf4", state.numel,
                            torch.bfloat16, state.state2.absmax, state.state2.code, state.offset, 256)
            return call(ops, "dequantize_4bit", packed, state.absmax, 64, "nf4", state.numel, torch.bfloat16)

        return run

    return impls, quantizer, dequantizer


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxK (default %(default)s)")
    ap.add_argument("--json", default=None, help="where to write results (default benchmarks/results/<gpu>/quant.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_quant.py needs a CUDA GPU")

    import qlora_kernels as qk

    F = common.bitsandbytes_functional()
    copy_gbs = common.copy_bandwidth_gbs()
    impls, quantizer, dequantizer = implementations()
    env = common.environment()
    print(f"{env['gpu']}  torch {env['torch']}  CUDA {env['cuda']}  backend {env.get('qlora_kernels_backend')}"
          f"  bitsandbytes {env.get('bitsandbytes', 'absent')}")
    print(f"device copy: {copy_gbs:.0f} GB/s (read + write)\n")
    header = f"{'op':<11}{'dq':<4}{'shape':<12}{'impl':<13}{'time us':>9}{'GB/s':>8}{'% copy':>8}{'vs bnb':>8}"
    print(header)
    print("-" * len(header))
    rows = []
    for shape_text in args.shapes.split(","):
        N, K = (int(v) for v in shape_text.lower().split("x"))
        n = N * K
        for double_quant in (True, False):
            q_bytes = 2 * n + common.format_bytes(n, double_quant)
            copies = common.copies_for(q_bytes)
            Ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
            cases = {name: quantizer(ops, double_quant) for name, ops in impls.items()}
            if F is not None:
                cases["bitsandbytes"] = lambda W, dq=double_quant: F.quantize_4bit(
                    W, blocksize=64, quant_type="nf4", compress_statistics=dq)
            times = {name: common.bench(fn, Ws) for name, fn in cases.items()}
            rows += report("quantize", double_quant, shape_text, q_bytes, times, copy_gbs)
            items = [qk.quantize_4bit(W, double_quant=double_quant) for W in Ws]
            dcases = {name: (dequantizer(ops), items) for name, ops in impls.items()}
            if F is not None:
                bnb_items = [F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
                             for W in Ws]
                dcases["bitsandbytes"] = (lambda item: F.dequantize_4bit(*item), bnb_items)
            del Ws
            times = {name: common.bench(fn, pool) for name, (fn, pool) in dcases.items()}
            rows += report("dequantize", double_quant, shape_text, q_bytes, times, copy_gbs)
            del items, dcases
            torch.cuda.empty_cache()
    path = common.save({"env": env, "copy_gbs": copy_gbs, "rows": rows}, "quant", args.json)
    print(f"\nsaved {path}")


def report(op, double_quant, shape, nbytes, times_ms, copy_gbs):
    rows = []
    bnb = times_ms.get("bitsandbytes")
    for name, ms in times_ms.items():
        gbs = nbytes / ms / 1e6
        vs = f"{bnb / ms:.2f}x" if bnb and name != "bitsandbytes" else ""
        print(f"{op:<11}{'y' if double_quant else 'n':<4}{shape:<12}{name:<13}{ms * 1e3:>9.1f}{gbs:>8.0f}"
              f"{100 * gbs / copy_gbs:>7.1f}%{vs:>8}")
        rows.append({"op": op, "double_quant": double_quant, "shape": shape, "impl": name, "ms": ms,
                     "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs,
                     "speedup_vs_bnb": (bnb / ms) if bnb and name != "bitsandbytes" else None})
    return rows


if __name__ == "__main__":
    main()
