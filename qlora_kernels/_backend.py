"""Which implementation serves CUDA tensors: the CUDA extension, Triton, or plain torch.

Chosen once, at import. ``QLORA_KERNELS_BACKEND=cuda|triton|torch`` forces one; a forced
backend that cannot load raises with the reason instead of falling back.
"""

from __future__ import annotations

import os
import warnings

BACKENDS = ("cuda", "triton", "torch")
ENV = "QLORA_KERNELS_BACKEND"

# Why the preferred backends were not taken, for backend_info().
reasons: dict[str, str] = {}


def _load_cuda() -> None:
    import torch  # noqa: F401  (the extension links against libtorch; load it first)

    from . import _C  # noqa: F401  (loading the library runs its TORCH_LIBRARY registrations)


def _load_triton() -> None:
    import triton  # noqa: F401

    from .triton import quant  # noqa: F401


def choose() -> str:
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"{ENV}: expected one of {BACKENDS}, got {forced!r}")
    order = (forced,) if forced else BACKENDS
    for name in order:
        if name == "torch":
            return name
        try:
            (_load_cuda if name == "cuda" else _load_triton)()
            return name
        except ImportError as err:
            reason = f"{type(err).__name__}: {err}"
            if name == "cuda":
                reason += (
                    " (the CUDA extension was not built: install with nvcc on PATH or "
                    "CUDA_HOME set, and without QLORA_KERNELS_SKIP_CUDA)"
                )
            reasons[name] = reason
            if forced:
                raise ImportError(f"{ENV}={forced}, but that backend cannot load: {reason}") from err
    raise AssertionError("unreachable")


def warn_if_degraded(name: str) -> None:
    """One warning when a GPU is present but the fast kernels are not."""
    import torch

    if name == "torch" and torch.cuda.is_available() and not os.environ.get(ENV):
        warnings.warn(
            "qlora_kernels: neither the CUDA extension nor Triton could load, so CUDA tensors "
            f"use the slow plain-torch reference ({reasons})",
            RuntimeWarning,
            stacklevel=3,
        )
