"""qlora_kernels: NF4/FP4 4-bit kernels for QLoRA, bit-compatible with bitsandbytes.

>>> import torch, qlora_kernels as qk
>>> packed, state = qk.quantize_4bit(torch.randn(256, 128))
>>> W = qk.dequantize_4bit(packed, state)
"""

from . import ops as _ops
from .functional import bits_per_weight, dequantize_4bit, dequantize_absmax, quantize_4bit
from .matmul import matmul_4bit
from .quant_state import QuantState

__version__ = "0.1.0"


def backend() -> str:
    """Which implementation serves CUDA tensors: ``"cuda"`` (the compiled extension),
    ``"triton"`` or ``"torch"`` (the plain reference). CPU tensors always use the reference.
    Set ``QLORA_KERNELS_BACKEND`` before import to force one."""
    return _ops.BACKEND


def backend_info() -> dict:
    """The active backend and, for each faster one that was skipped, why."""
    from . import _backend

    return {"backend": _ops.BACKEND, "skipped": dict(_backend.reasons)}


__all__ = [
    "QuantState", "backend", "backend_info", "bits_per_weight", "dequantize_4bit",
    "dequantize_absmax", "matmul_4bit", "quantize_4bit",
]

from .lora import matmul_4bit_lora  # noqa: E402
from .nn import add_lora  # noqa: E402

__all__ += ["add_lora", "matmul_4bit_lora"]

from . import hf, peft_format  # noqa: E402
from .hf import load_quantized, prepare_model_for_training, quantize_model, save_quantized  # noqa: E402
from .peft_format import load_adapter, save_adapter  # noqa: E402

__all__ += ["load_adapter", "load_quantized", "prepare_model_for_training", "quantize_model", "save_adapter",
            "save_quantized"]
