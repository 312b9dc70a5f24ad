"""What every benchmark shares: timing with rotated inputs, the measured copy ceiling, and the
JSON record (GPU, versions, commit) that results are saved with."""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from datetime import datetime, timezone

import torch

L2_FLUSH_BYTES = 4 * 50 * 2**20  # rotate inputs until the working set is 4x an H100's L2
HERE = os.path.dirname(os.path.abspath(__file__))


#: NF4 + double quant, blocks of 64: 4 + 8/64 + 32/(64*256) bits per weight, so a layer bound by
#: reading its weights runs at most 16 / 4.127 = 3.88x faster than in bf16 (Figure 3's line).
NF4_DQ_BITS = 4.127
BANDWIDTH_BOUND = 16 / NF4_DQ_BITS


def format_bytes(n: int, double_quant: bool = True, blocksize: int = 64) -> int:
    """Bytes of n weights in the 4-bit form: packed nibbles plus absmax (with double quant the
    8-bit codes and a float32 nested absmax per 256 of them, else float32 per block)."""
    nblocks = math.ceil(n / blocksize)
    absmax = nblocks + 4 * math.ceil(nblocks / 256) if double_quant else 4 * nblocks
    return (n + 1) // 2 + absmax


def gpu_slug() -> str:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE, check=False).stdout.strip()
    except OSError:
        commit = ""
    info = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit or None,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        import qlora_kernels

        info["qlora_kernels_backend"] = qlora_kernels.backend()
    except ImportError:
        pass
    bnb = bitsandbytes_functional()
    if bnb is not None:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    return info


def bitsandbytes_functional():
    """bitsandbytes.functional when importable (the comparison baseline), else None."""
    try:
        import bitsandbytes.functional as F
    except Exception:  # noqa: BLE001  (a broken install must not stop the benchmark)
        return None
    return F


def copies_for(bytes_per_call: int) -> int:
    return max(1, -(-L2_FLUSH_BYTES // max(bytes_per_call, 1)))


def bench(fn_of_input, inputs: list, warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median milliseconds of fn_of_input(inputs[i]), i rotating so that no call finds its
    operands in L2 from the call before."""
    import triton.testing

    state = {"i": 0}

    def step():
        fn_of_input(inputs[state["i"] % len(inputs)])
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def bench_graph(fn_of_input, inputs: list, reps: int = 25) -> float:
    """Median milliseconds of one fn_of_input call, replayed from a CUDA graph that holds one
    call per input (inputs rotated as in :func:`bench`).

    The graph removes the CPU's launch and Python overhead, so this is the GPU's time: what a
    call costs inside a training step whose CPU runs ahead of its GPU. fn_of_input must be
    capturable (no host synchronization); autograd's backward is."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture: cuBLAS workspaces, autotuning
        for inp in inputs:
            fn_of_input(inp)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for inp in inputs:
            fn_of_input(inp)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(inputs))
    del graph
    return sorted(times)[len(times) // 2]


def bench_gpu(name: str, fn_of_input, inputs: list, rep_ms: float = 200, eager_ms: float | None = None) -> float:
    """GPU milliseconds of one fn_of_input call, from a CUDA graph (:func:`bench_graph`). A call
    that cannot be captured gets its eager time (eager_ms when already measured), and a line
    saying so."""
    try:
        return bench_graph(fn_of_input, inputs)
    except RuntimeError as err:
        print(f"# {name}: CUDA graph capture failed ({str(err).splitlines()[0][:80]}); eager time used", flush=True)
        torch.cuda.synchronize()
        return eager_ms if eager_ms is not None else bench(fn_of_input, inputs, rep_ms=rep_ms)


def bench_gpu_and_eager(name: str, fn_of_input, inputs: list, rep_ms: float = 200) -> tuple[float, float]:
    """(GPU milliseconds, eager milliseconds with launch overhead) of one fn_of_input call."""
    eager = bench(fn_of_input, inputs, rep_ms=rep_ms)
    return bench_gpu(name, fn_of_input, inputs, eager_ms=eager), eager


def copy_bandwidth_gbs(nbytes: int = 2**30) -> float:
    """Device-to-device copy rate, bytes read + written per second: the 100% of '% of peak'."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda _: dst.copy_(src), [None])
    return 2 * nbytes / ms / 1e6


def save(results: dict, name: str, path: str | None) -> str:
    if path is None:
        folder = os.path.join(HERE, "results", gpu_slug())
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return path
