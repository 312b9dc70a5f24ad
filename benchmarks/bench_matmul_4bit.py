"""Fused 4-bit matmul (``qlora_kernels.matmul_4bit``) against bf16 ``F.linear`` and
bitsandbytes' ``matmul_4bit``, on LLaMA layer shapes, for decode batches.

    python benchmarks/bench_matmul_4bit.py [--shapes 4096x4096,...] [--m 1,4,16] [--quick] [--json out.json]

Shapes are W's ``N x K`` (out x in features). One row per (shape, M, implementation): median
GPU time with the weights rotated past L2 (calls replayed from a CUDA graph, so the time is the
kernels' own: a decode step captured in a graph pays nothing else; the eager time, CPU launch
overhead included, is printed beside it), effective GB/s of weight traffic (4-bit: packed bytes
+ absmax bytes; bf16: 2 bytes a weight), % of the device copy rate measured in the same run,
and the speedup over bf16 and over bitsandbytes. ``ours`` is the public path (fused kernel up
to ``fused_max_m()`` rows, dequantize + cuBLAS above); ``triton`` is the Triton kernel called
directly, timed too when the CUDA extension serves the public path. M above 64 shows the
crossover to the dequantize path.
"""

from __future__ import annotations

import argparse
import re

import torch
import torch.nn.functional as Fn

import common

LLAMA_SHAPES = {
    "7B": ["4096x4096", "11008x4096", "4096x11008"],
    "13B": ["5120x5120", "13824x5120", "5120x13824"],
    "33B": ["6656x6656", "17920x6656", "6656x17920"],
    "65B": ["8192x8192", "22016x8192", "8192x22016"],
    "70B": ["28672x8192"],
}
ALL_SHAPES = [s for shapes in LLAMA_SHAPES.values() for s in shapes]
DEFAULT_M = "1,2,4,8,16,32,64,128,256"
QUICK_SHAPES = "4096x4096,11008x4096,28672x8192"
QUICK_M = "1,4,16,64"


def model_of(shape: str) -> str:
    return next((m for m, shapes in LLAMA_SHAPES.items() if shape in shapes), "")


def make_cases(N: int, K: int, copies: int, bnb_F):
    """Per implementation: (function of one rotated input, list of inputs, weight bytes)."""
    import qlora_kernels as qk
    from qlora_kernels.matmul import _nested_args

    W16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    ours = [qk.quantize_4bit(W, "nf4", 64, double_quant=True) for W in W16]
    b4 = common.format_bytes(N * K)
    cases = {
        "bf16": (lambda item: Fn.linear(item[0], item[1]), W16, 2 * N * K),
        "ours": (lambda item: qk.matmul_4bit(item[0], *item[1]), ours, b4),
    }
    if qk.backend() == "cuda":
        from qlora_kernels.triton import matmul as TM

        def triton_call(item):
            packed, state = item[1]
            return TM.matmul_4bit(item[0], packed, state.absmax, 64, "nf4", N, *_nested_args(state))

        cases["triton"] = (triton_call, ours, b4)
    if bnb_F is not None:
        import bitsandbytes as bnb

        bnb_items = [bnb_F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4") for W in W16]
        cases["bnb"] = (lambda item: bnb.matmul_4bit(item[0], item[1][0].t(), quant_state=item[1][1]),
                        bnb_items, b4)
    return cases


def run(shapes, ms, copy_gbs, bnb_F, rep_ms):
    from qlora_kernels.matmul import fused_max_m

    header = (f"{'model':<5}{'shape':<13}{'M':>4} {'impl':<8}{'path':<9}{'time us':>9}{'GB/s':>7}{'% copy':>8}"
              f"{'vs bf16':>9}{'vs bnb':>8}{'eager us':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for shape in shapes:
        N, K = (int(v) for v in shape.lower().split("x"))
        # rotate the largest pool (bf16 W) past L2; every implementation uses as many copies
        copies = common.copies_for(2 * N * K)
        cases = make_cases(N, K, copies, bnb_F)
        for M in ms:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            times, eager = {}, {}
            for name, (fn, pool, _) in cases.items():
                items = list(zip(xs, pool))
                times[name], eager[name] = common.bench_gpu_and_eager(
                    name, lambda item, fn=fn: fn(item), items, rep_ms=rep_ms)
            paths = {"triton": "fused", "ours": "fused" if M <= fused_max_m() else
                     gemm_path(lambda: cases["ours"][0]((xs[0], cases["ours"][1][0])))}
            for name, ms_ in times.items():
                nbytes = cases[name][2]
                gbs = nbytes / ms_ / 1e6
                vs_bf16 = times["bf16"] / ms_
                vs_bnb = times["bnb"] / ms_ if "bnb" in times and name != "bnb" else None
                path = paths.get(name, "")
                print(f"{model_of(shape):<5}{shape:<13}{M:>4} {name:<8}{path:<9}{ms_ * 1e3:>9.1f}{gbs:>7.0f}"
                      f"{100 * gbs / copy_gbs:>7.1f}%{vs_bf16:>8.2f}x"
                      + (f"{vs_bnb:>7.2f}x" if vs_bnb else " " * 8) + f"{eager[name] * 1e3:>10.1f}", flush=True)
                rows.append({"model": model_of(shape), "shape": shape, "N": N, "K": K, "M": M, "impl": name,
                             "path": path, "ms": ms_, "eager_ms": eager[name], "weight_bytes": nbytes, "gbs": gbs,
                             "pct_copy": 100 * gbs / copy_gbs, "speedup_vs_bf16": vs_bf16,
                             "speedup_vs_bnb": vs_bnb})
            del xs
        del cases
        torch.cuda.empty_cache()
    return rows


def gemm_path(call) -> str:
    """Which path ``call`` (ours above the fused kernel's rows: the op gemm_4bit) took, from the
    kernels one profiled call launched: "wgmma256" / "wgmma128" (csrc/gemm_4bit.cu's kernel and
    its token tile) or "deq" (dequantize + cuBLAS)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    for event in prof.events():
        found = re.search(r"gemm_4bit_kernel(?:<[^,]+,\s*(?:\(bool\))?(?:true|false|1|0),\s*(\d+)|\w*?Lb[01]ELi(\d+)E)",
                          event.name)
        if found:
            return "wgmma" + (found.group(1) or found.group(2))
    return "deq"


# The tiles csrc/matmul_4bit.cu compiles (its kCompiled), by n-tiles of 8 tokens T, as
# QLORA_KERNELS_MM_TILE keys "R,D[,W,S]": R row tiles per warp, D loads in flight, W row groups
# per CTA, S K splits over the grid (0: enough to fill the GPU). The set --tiles times; a key
# not compiled would fall back to the default and be timed as if it were that key.
_ROW_GROUP_TILES = ["1,2,8,0", "1,2,8,1", "2,2,4,0"]
COMPILED_TILES = {
    1: ["1,2", "1,4"],
    2: ["2,2", "2,4", "4,2"] + _ROW_GROUP_TILES,
    4: ["2,2"] + _ROW_GROUP_TILES,
    8: ["1,2", "1,4", "2,2", "1,2,4,0"] + _ROW_GROUP_TILES,
}


def n_tiles(M: int) -> int:
    return 1 if M <= 8 else 2 if M <= 16 else 4 if M <= 32 else 8


def sweep_tiles(shapes, ms, rep_ms):
    """Every compiled tile of the CUDA kernel per (shape, M), forced with QLORA_KERNELS_MM_TILE,
    against the default choice: the data behind tile_config. Each forced tile is also checked
    against the float32 reference and for run-to-run equality."""
    import os

    import qlora_kernels as qk

    print(f"{'shape':<13}{'M':>4}  {'default us':>10}  tiles (R,D[,W,S]: us)  best")
    rows = []
    for shape in shapes:
        N, K = (int(v) for v in shape.lower().split("x"))
        copies = common.copies_for(common.format_bytes(N * K))
        W16 = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        ours = [qk.quantize_4bit(W, "nf4", 64, double_quant=True) for W in W16]
        ref_W = qk.dequantize_4bit(*ours[0], dtype=torch.float32)
        for M in ms:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            ref = xs[0].float() @ ref_W.T
            items = list(zip(xs, ours))
            call = lambda item: qk.matmul_4bit(item[0], *item[1])  # noqa: E731
            os.environ.pop("QLORA_KERNELS_MM_TILE", None)
            default_ms, _ = common.bench_gpu_and_eager("default", call, items, rep_ms=rep_ms)
            times = {}
            try:
                for key in COMPILED_TILES[n_tiles(M)]:
                    os.environ["QLORA_KERNELS_MM_TILE"] = key
                    out = call(items[0])
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    if err >= 1e-2 or not torch.equal(out, call(items[0])):
                        raise SystemExit(f"tile {key}, {shape}, M={M}: rel err {err:.2e} or not deterministic")
                    times[key], _ = common.bench_gpu_and_eager(key, call, items, rep_ms=rep_ms)
            finally:
                os.environ.pop("QLORA_KERNELS_MM_TILE", None)
            best = min(times, key=times.get)
            print(f"{shape:<13}{M:>4}  {default_ms * 1e3:>10.1f}  "
                  + "  ".join(f"{k}: {v * 1e3:.1f}" for k, v in times.items()) + f"  {best}", flush=True)
            rows.append({"shape": shape, "N": N, "K": K, "M": M, "default_ms": default_ms,
                         "tile_ms": times, "best": best})
            del xs
        del W16, ours
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help="comma-separated NxK (default: every LLaMA shape)")
    ap.add_argument("--m", default=None, help=f"comma-separated M (default {DEFAULT_M})")
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, M {QUICK_M}, shorter timing")
    ap.add_argument("--tiles", action="store_true",
                    help="instead: time every compiled tile of the CUDA kernel (QLORA_KERNELS_MM_TILE) "
                         "against the default, M up to 64 (saved as matmul_4bit_tile_sweep)")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/<gpu>/matmul_4bit.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_matmul_4bit.py needs a CUDA GPU")
    shapes = (args.shapes or (QUICK_SHAPES if args.quick else ",".join(ALL_SHAPES))).split(",")
    ms = [int(v) for v in (args.m or (QUICK_M if args.quick else DEFAULT_M)).split(",")]
    rep_ms = 50 if args.quick else 100

    bnb_F = common.bitsandbytes_functional()
    env = common.environment()
    copy_gbs = common.copy_bandwidth_gbs()
    print(f"{env['gpu']}  torch {env['torch']}  CUDA {env['cuda']}  backend {env.get('qlora_kernels_backend')}"
          f"  bitsandbytes {env.get('bitsandbytes', 'absent')}")
    print(f"device copy: {copy_gbs:.0f} GB/s (read + write); NF4 + double quant, blocksize 64; x bf16\n")
    if args.tiles:
        import qlora_kernels as qk

        if qk.backend() != "cuda":
            raise SystemExit("--tiles needs the CUDA extension (qlora_kernels.backend() is "
                             f"{qk.backend()!r})")
        from qlora_kernels.matmul import fused_max_m

        # only M that take the fused kernel: above it every forced tile would time the same path
        rows = sweep_tiles(shapes, [m for m in ms if m <= min(64, fused_max_m())], rep_ms)
        path = common.save({"env": env, "copy_gbs": copy_gbs, "rows": rows}, "matmul_4bit_tile_sweep", args.json)
        print(f"\nsaved {path}")
        return
    rows = run(shapes, ms, copy_gbs, bnb_F, rep_ms)
    path = common.save({"env": env, "copy_gbs": copy_gbs, "rows": rows}, "matmul_4bit", args.json)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
