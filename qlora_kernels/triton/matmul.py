"""Triton implementation of the fused 4-bit matmul (placeholder until the kernel lands: the
reference, so the op is defined for every backend)."""

from ..reference import matmul_4bit  # noqa: F401
