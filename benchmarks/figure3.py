"""The paper's Figure 3 for the GPU this runs on: batch-1 (M = 1) speedup of NF4 + double
quant over 16-bit, per LLaMA layer shape, ours and (when importable) bitsandbytes'. Times are
GPU times (calls replayed from a CUDA graph, weights rotated past L2), so the CPU's launch
overhead, which no kernel can remove, does not hide the kernels' speed.

    python benchmarks/figure3.py [--shapes 4096x4096,...] [--json out.json]

Writes benchmarks/results/<gpu>/figure3.json and figure3.png (matplotlib, Agg). The bound for
a purely bandwidth-bound layer is 16 / 4.127 bits = 3.88x; the chart draws it.
benchmarks/figure3_combine.py puts every GPU's JSON into one chart.
"""

from __future__ import annotations

import argparse
import os

import torch

import common
from bench_matmul_4bit import ALL_SHAPES, make_cases, model_of

BOUND = common.BANDWIDTH_BOUND


def measure(shapes, bnb_F):
    rows = []
    print(f"{'model':<5}{'shape':<13}{'bf16 us':>9}{'ours us':>9}{'ours x':>8}{'bnb us':>9}{'bnb x':>7}")
    for shape in shapes:
        N, K = (int(v) for v in shape.lower().split("x"))
        copies = common.copies_for(2 * N * K)
        cases = make_cases(N, K, copies, bnb_F)
        xs = [torch.randn(1, K, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        # GPU time (CUDA-graph replay): the layer's own cost, as in a captured decode step
        times = {name: common.bench_gpu(name, lambda item, fn=fn: fn(item), list(zip(xs, pool)))
                 for name, (fn, pool, _) in cases.items() if name in ("bf16", "ours", "bnb")}
        row = {"model": model_of(shape), "shape": shape, "N": N, "K": K,
               "bf16_ms": times["bf16"], "ours_ms": times["ours"],
               "speedup_ours": times["bf16"] / times["ours"],
               "bnb_ms": times.get("bnb"),
               "speedup_bnb": times["bf16"] / times["bnb"] if "bnb" in times else None}
        rows.append(row)
        bnb_text = f"{row['bnb_ms'] * 1e3:>9.1f}{row['speedup_bnb']:>6.2f}x" if row["bnb_ms"] else ""
        print(f"{row['model']:<5}{shape:<13}{row['bf16_ms'] * 1e3:>9.1f}{row['ours_ms'] * 1e3:>9.1f}"
              f"{row['speedup_ours']:>7.2f}x{bnb_text}", flush=True)
        del cases, xs
        torch.cuda.empty_cache()
    return rows


def plot(rows, gpu, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\n{r['shape']}" for r in rows]
    series = [("qlora_kernels NF4+DQ", [r["speedup_ours"] for r in rows])]
    if all(r["speedup_bnb"] is not None for r in rows):
        series.append(("bitsandbytes NF4+DQ", [r["speedup_bnb"] for r in rows]))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(BOUND, color="gray", linestyle="--", linewidth=0.8, label=f"bandwidth bound {BOUND:.2f}x")
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylabel("speedup over bf16 (batch 1)")
    ax.set_title(f"4-bit inference, batch size 1, LLaMA layer shapes (N x K): {gpu}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(ALL_SHAPES), help="comma-separated NxK")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/<gpu>/figure3.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("figure3.py needs a CUDA GPU")
    env = common.environment()
    print(f"{env['gpu']}  backend {env.get('qlora_kernels_backend')}  bitsandbytes {env.get('bitsandbytes', 'absent')}")
    rows = measure(args.shapes.split(","), common.bitsandbytes_functional())
    path = common.save({"env": env, "bound": BOUND, "rows": rows}, "figure3", args.json)
    png = os.path.splitext(path)[0] + ".png"
    plot(rows, env["gpu"], png)
    print(f"\nsaved {path} and {png}")


if __name__ == "__main__":
    main()
