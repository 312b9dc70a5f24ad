"""Every benchmark script parses its command line without a GPU (`--help`): an import or
syntax error in a benchmark shows here, not on the GPU machine where device time is scarce."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(p for p in glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))
                 if os.path.basename(p) != "common.py")


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_benchmark_help(script):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_the_benchmarks_are_found():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert {"bench_matmul_4bit.py", "bench_matmul_lora.py", "bench_train.py", "figure3.py"} <= names
