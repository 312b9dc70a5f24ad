"""Shared test setup.

Without a GPU, Triton kernels can only run in its interpreter, and TRITON_INTERPRET must be
set before triton is first imported, so it is set here, before any test module loads.
"""

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fresh random inputs on every run; the seed is printed in the header so a failure can be
# replayed with QLORA_KERNELS_TEST_SEED=<seed>.
SEED = int(os.environ.get("QLORA_KERNELS_TEST_SEED", "0")) or int.from_bytes(os.urandom(4), "little")


def pytest_report_header(config):
    return f"qlora_kernels: test seed {SEED} (replay with QLORA_KERNELS_TEST_SEED={SEED}), CUDA: {HAS_CUDA}"


@pytest.fixture
def rng(request):
    """A generator per test, seeded from the session seed and the test's name."""
    import zlib

    g = torch.Generator()
    g.manual_seed(SEED ^ zlib.crc32(request.node.nodeid.encode()))
    return g


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # -q hides the header: repeat the seed whenever something failed, so it can be replayed
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"qlora_kernels: failing run's test seed: QLORA_KERNELS_TEST_SEED={SEED}")
