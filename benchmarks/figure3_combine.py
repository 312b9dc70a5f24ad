"""Every GPU's Figure 3 in one chart: reads benchmarks/results/*/figure3.json (written by
figure3.py on each GPU) and draws, per LLaMA layer shape, one bar per GPU of the batch-1
speedup of our NF4 + double quant over bf16, to benchmarks/results/figure3_all.png.

    python benchmarks/figure3_combine.py [--out path.png]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

BOUND = common.BANDWIDTH_BOUND


def load(results_dir):
    runs = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "figure3.json"))):
        with open(path) as f:
            data = json.load(f)
        gpu = data.get("env", {}).get("gpu") or os.path.basename(os.path.dirname(path))
        runs[gpu] = {r["shape"]: r for r in data["rows"]}
    return runs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="folder of <gpu>/figure3.json")
    ap.add_argument("--out", default=None, help="PNG path (default <results>/figure3_all.png)")
    args = ap.parse_args()
    runs = load(args.results)
    if not runs:
        raise SystemExit(f"no {args.results}/*/figure3.json found: run benchmarks/figure3.py on a GPU first")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = []
    for rows in runs.values():
        shapes += [s for s in rows if s not in shapes]
    models = {s: next(r[s]["model"] for r in runs.values() if s in r) for s in shapes}
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(shapes)), 4.8))
    width = 0.8 / len(runs)
    for i, (gpu, rows) in enumerate(runs.items()):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j, s in enumerate(shapes) if s in rows]
        values = [rows[s]["speedup_ours"] for s in shapes if s in rows]
        ax.bar(xs, values, width, label=gpu)
        print(f"{gpu}: " + ", ".join(f"{s} {rows[s]['speedup_ours']:.2f}x" for s in shapes if s in rows))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(BOUND, color="gray", linestyle="--", linewidth=0.8, label=f"bandwidth bound {BOUND:.2f}x")
    ax.set_xticks(range(len(shapes)), [f"{models[s]}\n{s}" for s in shapes], fontsize=7)
    ax.set_ylabel("NF4+DQ speedup over bf16 (batch 1)")
    ax.set_title("4-bit inference at batch size 1 across GPUs (qlora_kernels)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.out or os.path.join(args.results, "figure3_all.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
