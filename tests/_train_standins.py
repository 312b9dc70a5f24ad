"""TEMPORARY stand-ins for add_lora / PagedAdamW until branches lora and optim are merged."""
import importlib
import sys
import types

import torch
from torch import nn

import qlora_kernels
from qlora_kernels.nn import Linear4bit


class StandInLoRA(nn.Module):
    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        object.__setattr__(self, "base", base)  # not a submodule: LoRALinear4bit is the layer itself
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = dropout
        self.drop = nn.Dropout(dropout)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.zeros_(self.lora_B.weight)

    def dequantize(self, dtype=None):
        return self.base.dequantize(dtype)

    def forward(self, x):
        y = self.base(x)
        return y + (self.lora_B(self.lora_A(self.drop(x).float())) * self.scaling).to(y.dtype)


def add_lora(model, r=64, alpha=16, dropout=0.1, target="all-linear", lora_dtype=torch.float32):
    model.requires_grad_(False)
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear4bit):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, StandInLoRA(m, r, alpha, dropout))
    return model


def install():
    if not hasattr(qlora_kernels, "add_lora"):
        qlora_kernels.add_lora = add_lora
    try:
        importlib.import_module("qlora_kernels.optim")
    except ImportError:
        mod = types.ModuleType("qlora_kernels.optim")
        mod.PagedAdamW = torch.optim.AdamW
        sys.modules["qlora_kernels.optim"] = mod
        qlora_kernels.optim = mod
