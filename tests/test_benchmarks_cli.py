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


def test_static_decoder_matches_generate():
    """bench_decode's static-KV-cache greedy loop (the one its CUDA-graph rows replay) gives
    generate()'s greedy tokens; run eagerly on a tiny random LLaMA on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from bench_decode import StaticDecoder
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    prompt = torch.randint(0, 97, (1, 7))
    with torch.inference_mode():
        want = model.generate(prompt, max_new_tokens=9, min_new_tokens=9, do_sample=False, pad_token_id=0,
                              eos_token_id=None)
    decoder = StaticDecoder(model, prompt.shape[1], 9, graphs=False)
    got = decoder.generate(prompt)
    assert torch.equal(got, want)
    assert torch.equal(decoder.generate(prompt), want)  # the cache is reused by a second run
